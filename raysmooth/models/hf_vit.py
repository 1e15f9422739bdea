"""Hugging Face transformers ViT checkpoints as timm VisionTransformers (key converter).

Carlini et al.'s CIFAR-10 classifier (``aaraki/vit-base-patch16-224-in21k-finetuned-cifar10``) is a
transformers ``ViTForImageClassification``; timm's ViT computes the same function once the separate
query/key/value projections are fused and the names mapped, and LayerNorm keeps the checkpoint's eps
(transformers uses 1e-12, timm 1e-6).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import ModelLoadError

__all__ = ["hf_vit_to_timm", "hf_vit_layer_norm_eps"]

# Released checkpoints (transformers 4.x) name layers vit.encoder.layer.N; transformers 5 vit.layers.N.
_LAYER = re.compile(r"^vit\.(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
_LAYOUTS = {
    "legacy": {
        "q": "attention.attention.query",
        "k": "attention.attention.key",
        "v": "attention.attention.value",
        "attn.proj": "attention.output.dense",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
    },
    "v5": {
        "q": "attention.q_proj",
        "k": "attention.k_proj",
        "v": "attention.v_proj",
        "attn.proj": "attention.o_proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
    },
}


def hf_vit_layer_norm_eps(checkpoint: str | Path) -> float:
    """The eps of the checkpoint's LayerNorms, from the config.json beside it (default 1e-12)."""
    config = Path(checkpoint).parent / "config.json"
    if config.is_file():
        return float(json.loads(config.read_text()).get("layer_norm_eps", 1e-12))
    return 1e-12


def hf_vit_to_timm(sd: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename a ``ViTForImageClassification`` state dict into timm ``VisionTransformer`` keys."""
    if "vit.embeddings.cls_token" not in sd:
        raise ModelLoadError(
            f"{source}: not a transformers ViTForImageClassification state dict (no vit.embeddings.cls_token)"
        )
    out = {
        "cls_token": sd["vit.embeddings.cls_token"],
        "pos_embed": sd["vit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["vit.layernorm.weight"],
        "norm.bias": sd["vit.layernorm.bias"],
        "head.weight": sd["classifier.weight"],
        "head.bias": sd["classifier.bias"],
    }
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = _LAYER.match(key)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    for i, p in sorted(layers.items()):
        names = _LAYOUTS["legacy" if "attention.attention.query.weight" in p else "v5"]
        try:
            for part in ("weight", "bias"):
                out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([p[f"{names[s]}.{part}"] for s in "qkv"])
                for timm_name in ("attn.proj", "mlp.fc1", "mlp.fc2", "norm1", "norm2"):
                    out[f"blocks.{i}.{timm_name}.{part}"] = p[f"{names[timm_name]}.{part}"]
        except KeyError as exc:
            raise ModelLoadError(f"{source}: layer {i} lacks {exc.args[0]}") from None
    return out
