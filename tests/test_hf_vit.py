"""A transformers ViTForImageClassification checkpoint, converted into timm's ViT, computes the same logits."""

import pytest
import torch
from safetensors.torch import save_file

from raysmooth.errors import ModelLoadError
from raysmooth.models import load_classifier

transformers = pytest.importorskip("transformers")


def _hf_vit(folder):
    config = transformers.ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_labels=10,
    )
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    for p in model.parameters():  # move LayerNorms and biases off their trivial init
        p.data.add_(0.05 * torch.randn_like(p))
    folder.mkdir()
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return model


def test_converted_hf_vit_gives_the_same_logits(tmp_path):
    hf = _hf_vit(tmp_path / "hf")
    clf = load_classifier(
        dict(
            name="vit_base_patch16_224",
            num_classes=10,
            in_chans=3,
            checkpoint=str(tmp_path / "hf"),
            checkpoint_format="hf_vit",
            input_size=[32, 32],
            mean=[0.5] * 3,
            std=[0.5] * 3,
            model_kwargs=dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0),
        )
    )
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ours = clf(x)
        ref = hf(pixel_values=(x - 0.5) / 0.5).logits
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


LEGACY = {
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}


def test_the_released_transformers_4_layout_converts_the_same(tmp_path):
    # Released checkpoints (e.g. Carlini et al.'s CIFAR-10 ViT) use vit.encoder.layer.N.attention.attention.query …
    hf = _hf_vit(tmp_path / "hf")
    sd = {}
    for k, v in hf.state_dict().items():
        for new, old in LEGACY.items():
            k = k.replace(f".{new}.", f".{old}.")
        sd[k.replace("vit.layers.", "vit.encoder.layer.")] = v.contiguous()
    (tmp_path / "legacy").mkdir()
    save_file(sd, str(tmp_path / "legacy" / "model.safetensors"))
    kw = dict(
        name="vit_base_patch16_224",
        num_classes=10,
        in_chans=3,
        checkpoint_format="hf_vit",
        input_size=[32, 32],
        mean=[0.5] * 3,
        std=[0.5] * 3,
        model_kwargs=dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0),
    )
    a = load_classifier(dict(kw, checkpoint=str(tmp_path / "hf")))
    b = load_classifier(dict(kw, checkpoint=str(tmp_path / "legacy" / "model.safetensors")))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_a_timm_state_dict_is_not_taken_for_an_hf_vit(tmp_path):
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="not a transformers ViTForImageClassification"):
        load_classifier(
            dict(
                name="vit_base_patch16_224",
                num_classes=10,
                checkpoint=str(tmp_path),
                checkpoint_format="hf_vit",
                model_kwargs=dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4),
            )
        )
