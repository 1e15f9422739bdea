"""OpenAI ADM checkpoints (improved-diffusion, guided-diffusion) as ``diffusers.UNet2DModel``.

The papers' denoisers are ADM UNets saved as plain state dicts (``cifar10_uncond_50M_500K.pt``,
``256x256_diffusion_uncond.pt``). Their architecture maps one-to-one onto ``UNet2DModel`` given
scale-shift time conditioning, GroupNorm eps 1e-5, 32-group attention norms, and one subtlety: ADM's
"legacy" attention lays the fused qkv projection out per head as [q_h, k_h, v_h] blocks, so it must
be de-interleaved; a plain split into three thirds is wrong for more than one head
(docs/methods.md §3.5). Files load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import ModelLoadError
from .checkpoints import load_state_dict_file, mismatch, replacing_folder

__all__ = [
    "ADMConfig",
    "ADM_PRESETS",
    "adm_key_shapes",
    "adm_to_diffusers",
    "unet_config",
    "convert_adm_checkpoint",
    "deinterleave_qkv",
    "scheduler_config",
    "timestep_scale",
]


@dataclass
class ADMConfig:
    """The hyper-parameters that fix an ADM UNet's layout (names as in the OpenAI scripts)."""

    image_size: int = 32
    in_channels: int = 3
    model_channels: int = 128
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    num_res_blocks: int = 3
    attention_resolutions: list[int] = field(default_factory=lambda: [16, 8])  # in pixels
    num_heads: int = 4
    num_head_channels: int = -1  # if > 0, heads = channels // num_head_channels
    learn_sigma: bool = True
    resblock_updown: bool = False
    conv_resample: bool = True
    # The noise schedule the model was trained with, and how it is told the timestep.
    diffusion_steps: int = 4000
    noise_schedule: str = "cosine"  # cosine | linear
    rescale_timesteps: bool = True  # improved-diffusion feeds t·1000/T

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    def heads(self, channels: int) -> int:
        return channels // self.num_head_channels if self.num_head_channels > 0 else self.num_heads


ADM_PRESETS: dict[str, ADMConfig] = {
    # improved-diffusion cifar10_uncond_50M_500K.pt (Carlini et al., Jeong & Shin, DiffSmooth on CIFAR-10)
    "cifar10": ADMConfig(),
    # guided-diffusion 256x256_diffusion_uncond.pt (Carlini et al., DiffSmooth on ImageNet)
    "imagenet256": ADMConfig(
        image_size=256,
        model_channels=256,
        channel_mult=[1, 1, 2, 2, 4, 4],
        num_res_blocks=2,
        attention_resolutions=[32, 16, 8],
        num_heads=4,
        num_head_channels=64,
        resblock_updown=True,
        diffusion_steps=1000,
        noise_schedule="linear",
        rescale_timesteps=False,
    ),
}


# ---- the ADM layout ---------------------------------------------------------------------------------
def _resblock(prefix: str, cin: int, cout: int, emb: int) -> Iterator[tuple[str, tuple]]:
    yield f"{prefix}.in_layers.0.weight", (cin,)
    yield f"{prefix}.in_layers.0.bias", (cin,)
    yield f"{prefix}.in_layers.2.weight", (cout, cin, 3, 3)
    yield f"{prefix}.in_layers.2.bias", (cout,)
    yield f"{prefix}.emb_layers.1.weight", (2 * cout, emb)  # scale and shift
    yield f"{prefix}.emb_layers.1.bias", (2 * cout,)
    yield f"{prefix}.out_layers.0.weight", (cout,)
    yield f"{prefix}.out_layers.0.bias", (cout,)
    yield f"{prefix}.out_layers.3.weight", (cout, cout, 3, 3)
    yield f"{prefix}.out_layers.3.bias", (cout,)
    if cin != cout:
        yield f"{prefix}.skip_connection.weight", (cout, cin, 1, 1)
        yield f"{prefix}.skip_connection.bias", (cout,)


def _attention(prefix: str, c: int) -> Iterator[tuple[str, tuple]]:
    yield f"{prefix}.norm.weight", (c,)
    yield f"{prefix}.norm.bias", (c,)
    yield f"{prefix}.qkv.weight", (3 * c, c, 1)
    yield f"{prefix}.qkv.bias", (3 * c,)
    yield f"{prefix}.proj_out.weight", (c, c, 1)
    yield f"{prefix}.proj_out.bias", (c,)


def _walk(cfg: ADMConfig):
    """The block structure as (kind, adm_prefix, diffusers_prefix, cin, cout) events."""
    mc = cfg.model_channels
    attn_ds = {cfg.image_size // r for r in cfg.attention_resolutions}
    levels = len(cfg.channel_mult)
    yield ("conv_in", "input_blocks.0.0", "conv_in", cfg.in_channels, mc)
    chans, ch, ds, k = [mc], mc, 1, 1
    for level, mult in enumerate(cfg.channel_mult):
        for j in range(cfg.num_res_blocks):
            out = mc * mult
            yield ("res", f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}", ch, out)
            ch = out
            if ds in attn_ds:
                yield ("attn", f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}", ch, ch)
            chans.append(ch)
            k += 1
        if level != levels - 1:
            kind = "res_down" if cfg.resblock_updown else "down"
            yield (kind, f"input_blocks.{k}.0", f"down_blocks.{level}.downsamplers.0", ch, ch)
            chans.append(ch)
            ds *= 2
            k += 1
    yield ("res", "middle_block.0", "mid_block.resnets.0", ch, ch)
    yield ("attn", "middle_block.1", "mid_block.attentions.0", ch, ch)
    yield ("res", "middle_block.2", "mid_block.resnets.1", ch, ch)
    k = 0
    for i, level in enumerate(reversed(range(levels))):
        mult = cfg.channel_mult[level]
        for j in range(cfg.num_res_blocks + 1):
            skip = chans.pop()
            out = mc * mult
            yield ("res", f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", ch + skip, out)
            ch = out
            sub = 1
            if ds in attn_ds:
                yield ("attn", f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", ch, ch)
                sub = 2
            if level and j == cfg.num_res_blocks:
                kind = "res_up" if cfg.resblock_updown else "up"
                yield (kind, f"output_blocks.{k}.{sub}", f"up_blocks.{i}.upsamplers.0", ch, ch)
                ds //= 2
            k += 1
    yield ("out", "out", "conv_out", ch, cfg.out_channels)


def adm_key_shapes(cfg: ADMConfig) -> dict[str, tuple]:
    """Every key of an ADM state dict with this config, with its shape (as in the released files)."""
    mc, emb = cfg.model_channels, 4 * cfg.model_channels
    shapes: dict[str, tuple] = {
        "time_embed.0.weight": (emb, mc),
        "time_embed.0.bias": (emb,),
        "time_embed.2.weight": (emb, emb),
        "time_embed.2.bias": (emb,),
    }
    for kind, adm, _, cin, cout in _walk(cfg):
        if kind == "conv_in":
            shapes[f"{adm}.weight"], shapes[f"{adm}.bias"] = (cout, cin, 3, 3), (cout,)
        elif kind in ("res", "res_down", "res_up"):
            shapes.update(_resblock(adm, cin, cout, emb))
        elif kind == "attn":
            shapes.update(_attention(adm, cin))
        elif kind == "down" and cfg.conv_resample:
            shapes[f"{adm}.op.weight"], shapes[f"{adm}.op.bias"] = (cout, cin, 3, 3), (cout,)
        elif kind == "up" and cfg.conv_resample:
            shapes[f"{adm}.conv.weight"], shapes[f"{adm}.conv.bias"] = (cout, cin, 3, 3), (cout,)
        elif kind == "out":
            shapes.update(
                {"out.0.weight": (cin,), "out.0.bias": (cin,), "out.2.weight": (cout, cin, 3, 3), "out.2.bias": (cout,)}
            )
    return shapes


def unet_config(cfg: ADMConfig) -> dict:
    """The ``UNet2DModel`` config that mirrors an ADM config."""
    attn_ds = {cfg.image_size // r for r in cfg.attention_resolutions}
    levels = len(cfg.channel_mult)
    widths = [cfg.model_channels * m for i, m in enumerate(cfg.channel_mult) if 2**i in attn_ds]
    widths.append(cfg.model_channels * cfg.channel_mult[-1])  # the middle block
    head_dims = {c // cfg.heads(c) for c in widths}
    if len(head_dims) > 1:
        raise ModelLoadError("this ADM config uses different head sizes per level, which UNet2DModel cannot express")
    head_dim = head_dims.pop()
    down, up = [], []
    for i in range(levels):
        has_attn = 2**i in attn_ds
        if has_attn:
            down.append("AttnDownBlock2D")
        else:
            down.append("ResnetDownsampleBlock2D" if cfg.resblock_updown else "DownBlock2D")
    for i in reversed(range(levels)):
        has_attn = 2**i in attn_ds
        if has_attn:
            up.append("AttnUpBlock2D")
        else:
            up.append("ResnetUpsampleBlock2D" if cfg.resblock_updown else "UpBlock2D")
    return dict(
        sample_size=cfg.image_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        layers_per_block=cfg.num_res_blocks,
        block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult],
        down_block_types=down,
        up_block_types=up,
        time_embedding_type="positional",
        flip_sin_to_cos=True,
        freq_shift=0,
        norm_num_groups=32,
        norm_eps=1e-5,
        attn_norm_num_groups=32,
        attention_head_dim=head_dim,
        resnet_time_scale_shift="scale_shift",
        downsample_type="resnet" if cfg.resblock_updown else "conv",
        upsample_type="resnet" if cfg.resblock_updown else "conv",
        act_fn="silu",
        add_attention=True,
    )


# ---- the mapping ---------------------------------------------------------------------------------------
def deinterleave_qkv(w: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a legacy fused qkv weight or bias, laid out [q_h, k_h, v_h] per head, into q, k, v."""
    rest = w.shape[1:]
    three_c = w.shape[0]
    d = three_c // (3 * heads)
    w = w.reshape(heads, 3, d, *rest).transpose(0, 1).reshape(3, heads * d, *rest)
    return w[0], w[1], w[2]


def _map_resblock(sd: dict, adm: str, dif: str) -> dict:
    out = {
        f"{dif}.norm1.weight": sd[f"{adm}.in_layers.0.weight"],
        f"{dif}.norm1.bias": sd[f"{adm}.in_layers.0.bias"],
        f"{dif}.conv1.weight": sd[f"{adm}.in_layers.2.weight"],
        f"{dif}.conv1.bias": sd[f"{adm}.in_layers.2.bias"],
        f"{dif}.time_emb_proj.weight": sd[f"{adm}.emb_layers.1.weight"],
        f"{dif}.time_emb_proj.bias": sd[f"{adm}.emb_layers.1.bias"],
        f"{dif}.norm2.weight": sd[f"{adm}.out_layers.0.weight"],
        f"{dif}.norm2.bias": sd[f"{adm}.out_layers.0.bias"],
        f"{dif}.conv2.weight": sd[f"{adm}.out_layers.3.weight"],
        f"{dif}.conv2.bias": sd[f"{adm}.out_layers.3.bias"],
    }
    if f"{adm}.skip_connection.weight" in sd:
        out[f"{dif}.conv_shortcut.weight"] = sd[f"{adm}.skip_connection.weight"]
        out[f"{dif}.conv_shortcut.bias"] = sd[f"{adm}.skip_connection.bias"]
    return out


def _map_attention(sd: dict, adm: str, dif: str, heads: int) -> dict:
    qw, kw, vw = deinterleave_qkv(sd[f"{adm}.qkv.weight"][..., 0], heads)
    qb, kb, vb = deinterleave_qkv(sd[f"{adm}.qkv.bias"], heads)
    return {
        f"{dif}.group_norm.weight": sd[f"{adm}.norm.weight"],
        f"{dif}.group_norm.bias": sd[f"{adm}.norm.bias"],
        f"{dif}.to_q.weight": qw,
        f"{dif}.to_q.bias": qb,
        f"{dif}.to_k.weight": kw,
        f"{dif}.to_k.bias": kb,
        f"{dif}.to_v.weight": vw,
        f"{dif}.to_v.bias": vb,
        f"{dif}.to_out.0.weight": sd[f"{adm}.proj_out.weight"][..., 0],
        f"{dif}.to_out.0.bias": sd[f"{adm}.proj_out.bias"],
    }


def _check_layout(sd: dict, cfg: ADMConfig, source: str) -> None:
    problem = mismatch(adm_key_shapes(cfg), sd)
    if problem:
        raise ModelLoadError(f"{source}: not an ADM checkpoint of this config: {problem}")


def adm_to_diffusers(
    sd: dict[str, torch.Tensor], cfg: ADMConfig, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename (and de-interleave) an ADM state dict into ``UNet2DModel(**unet_config(cfg))`` keys."""
    _check_layout(sd, cfg, source)
    out = {
        "time_embedding.linear_1.weight": sd["time_embed.0.weight"],
        "time_embedding.linear_1.bias": sd["time_embed.0.bias"],
        "time_embedding.linear_2.weight": sd["time_embed.2.weight"],
        "time_embedding.linear_2.bias": sd["time_embed.2.bias"],
    }
    for kind, adm, dif, cin, _cout in _walk(cfg):
        if kind == "conv_in":
            out["conv_in.weight"], out["conv_in.bias"] = sd[f"{adm}.weight"], sd[f"{adm}.bias"]
        elif kind in ("res", "res_down", "res_up"):
            out.update(_map_resblock(sd, adm, dif))
        elif kind == "attn":
            out.update(_map_attention(sd, adm, dif, cfg.heads(cin)))
        elif kind == "down" and cfg.conv_resample:
            out[f"{dif}.conv.weight"], out[f"{dif}.conv.bias"] = sd[f"{adm}.op.weight"], sd[f"{adm}.op.bias"]
        elif kind == "up" and cfg.conv_resample:
            out[f"{dif}.conv.weight"], out[f"{dif}.conv.bias"] = sd[f"{adm}.conv.weight"], sd[f"{adm}.conv.bias"]
        elif kind == "out":
            out.update(
                {
                    "conv_norm_out.weight": sd["out.0.weight"],
                    "conv_norm_out.bias": sd["out.0.bias"],
                    "conv_out.weight": sd["out.2.weight"],
                    "conv_out.bias": sd["out.2.bias"],
                }
            )
    return out


def scheduler_config(cfg: ADMConfig) -> dict:
    """``DDPMScheduler`` arguments of the schedule the ADM model was trained with (guided-diffusion
    scales the linear betas by 1000/T)."""
    return dict(
        num_train_timesteps=cfg.diffusion_steps,
        beta_schedule="squaredcos_cap_v2" if cfg.noise_schedule == "cosine" else "linear",
        beta_start=1e-4 * 1000 / cfg.diffusion_steps,
        beta_end=0.02 * 1000 / cfg.diffusion_steps,
        variance_type="learned_range" if cfg.learn_sigma else "fixed_small",
    )


def timestep_scale(cfg: ADMConfig) -> float:
    """What the UNet is told for timestep t is t·scale (improved-diffusion's rescale_timesteps)."""
    return 1000 / cfg.diffusion_steps if cfg.rescale_timesteps else 1.0


def convert_adm_checkpoint(src: str | Path, dst: str | Path, cfg: ADMConfig) -> Path:
    """Write a diffusers folder (``unet/``, ``scheduler/``, ``raysmooth.json``) from an ADM ``.pt``."""
    from diffusers import DDPMScheduler, UNet2DModel

    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise ModelLoadError(f"{dst} exists and is not empty; choose a new output folder")
    sd = load_state_dict_file(src)
    mapped = adm_to_diffusers(sd, cfg, str(src))
    unet = UNet2DModel(**unet_config(cfg))
    missing, unexpected = unet.load_state_dict(mapped, strict=False)
    if missing or unexpected:  # a bug in the mapping, not a user error
        raise RuntimeError(f"ADM mapping incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with replacing_folder(dst) as tmp:
        unet.save_pretrained(tmp / "unet")
        DDPMScheduler(**scheduler_config(cfg)).save_pretrained(tmp / "scheduler")
        (tmp / "raysmooth.json").write_text(
            json.dumps({"source": str(src), "adm_config": asdict(cfg), "timestep_scale": timestep_scale(cfg)}, indent=2)
            + "\n"
        )
    return dst
