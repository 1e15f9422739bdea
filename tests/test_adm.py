"""ADM (improved-/guided-diffusion) checkpoints converted to diffusers compute what the ADM layout means.

The reference below is written from the ADM equations (GroupNorm, SiLU, scale-shift time conditioning,
legacy per-head fused qkv, skip concatenation), one function per block, and runs directly on the
ADM-keyed state dict; the converted UNet2DModel must agree with it on random weights.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from raysmooth.errors import ModelLoadError
from raysmooth.models.adm import (
    ADMConfig,
    adm_key_shapes,
    adm_to_diffusers,
    convert_adm_checkpoint,
    deinterleave_qkv,
    unet_config,
)

IMPROVED = ADMConfig(
    image_size=8,
    in_channels=3,
    model_channels=32,
    channel_mult=[1, 2, 2],
    num_res_blocks=1,
    attention_resolutions=[4],
    num_heads=2,
    learn_sigma=True,
    diffusion_steps=4000,
    noise_schedule="cosine",
)
GUIDED = ADMConfig(
    image_size=8,
    in_channels=3,
    model_channels=32,
    channel_mult=[1, 1, 2],
    num_res_blocks=1,
    attention_resolutions=[4, 2],
    num_head_channels=16,
    resblock_updown=True,
    learn_sigma=True,
    diffusion_steps=1000,
    noise_schedule="linear",
    rescale_timesteps=False,
)


def random_adm(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in adm_key_shapes(cfg).items():
        if key.endswith("weight") and len(shape) == 1:  # GroupNorm scales near 1
            sd[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            sd[key] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return sd


# ---- the reference, from the equations ------------------------------------------------------------
def _gn(x, sd, p):
    return F.group_norm(x, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-5)


def _res(sd, p, x, emb, up=False, down=False):
    h = F.silu(_gn(x, sd, f"{p}.in_layers.0"))
    if up:
        h, x = F.interpolate(h, scale_factor=2, mode="nearest"), F.interpolate(x, scale_factor=2, mode="nearest")
    if down:
        h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    h = F.conv2d(h, sd[f"{p}.in_layers.2.weight"], sd[f"{p}.in_layers.2.bias"], padding=1)
    scale, shift = F.linear(F.silu(emb), sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"]).chunk(2, dim=1)
    h = _gn(h, sd, f"{p}.out_layers.0") * (1 + scale[..., None, None]) + shift[..., None, None]
    h = F.conv2d(F.silu(h), sd[f"{p}.out_layers.3.weight"], sd[f"{p}.out_layers.3.bias"], padding=1)
    if f"{p}.skip_connection.weight" in sd:
        x = F.conv2d(x, sd[f"{p}.skip_connection.weight"], sd[f"{p}.skip_connection.bias"])
    return x + h


def _attn(sd, p, x, heads):
    b, c, hh, ww = x.shape
    flat = x.reshape(b, c, -1)
    qkv = F.conv1d(_gn(flat, sd, f"{p}.norm"), sd[f"{p}.qkv.weight"], sd[f"{p}.qkv.bias"])
    d = c // heads
    q, k, v = qkv.reshape(b * heads, 3 * d, -1).split(d, dim=1)  # per head: [q, k, v]
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(d), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
    return (flat + F.conv1d(a, sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"])).reshape(b, c, hh, ww)


def reference_forward(sd, cfg, x, t):
    half = cfg.model_channels // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    emb = F.linear(
        F.silu(F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
        sd["time_embed.2.weight"],
        sd["time_embed.2.bias"],
    )
    attn_ds = {cfg.image_size // r for r in cfg.attention_resolutions}
    heads = lambda c: c // cfg.num_head_channels if cfg.num_head_channels > 0 else cfg.num_heads  # noqa: E731
    h = F.conv2d(x, sd["input_blocks.0.0.weight"], sd["input_blocks.0.0.bias"], padding=1)
    hs, k, ds = [h], 1, 1
    for level in range(len(cfg.channel_mult)):
        for _ in range(cfg.num_res_blocks):
            h = _res(sd, f"input_blocks.{k}.0", h, emb)
            if ds in attn_ds:
                h = _attn(sd, f"input_blocks.{k}.1", h, heads(h.shape[1]))
            hs.append(h)
            k += 1
        if level != len(cfg.channel_mult) - 1:
            if cfg.resblock_updown:
                h = _res(sd, f"input_blocks.{k}.0", h, emb, down=True)
            else:
                h = F.conv2d(
                    h, sd[f"input_blocks.{k}.0.op.weight"], sd[f"input_blocks.{k}.0.op.bias"], stride=2, padding=1
                )
            hs.append(h)
            k, ds = k + 1, ds * 2
    h = _res(sd, "middle_block.0", h, emb)
    h = _attn(sd, "middle_block.1", h, heads(h.shape[1]))
    h = _res(sd, "middle_block.2", h, emb)
    k = 0
    for level in reversed(range(len(cfg.channel_mult))):
        for j in range(cfg.num_res_blocks + 1):
            h = _res(sd, f"output_blocks.{k}.0", torch.cat([h, hs.pop()], dim=1), emb)
            sub = 1
            if ds in attn_ds:
                h = _attn(sd, f"output_blocks.{k}.1", h, heads(h.shape[1]))
                sub = 2
            if level and j == cfg.num_res_blocks:
                if cfg.resblock_updown:
                    h = _res(sd, f"output_blocks.{k}.{sub}", h, emb, up=True)
                else:
                    h = F.interpolate(h, scale_factor=2, mode="nearest")
                    h = F.conv2d(
                        h,
                        sd[f"output_blocks.{k}.{sub}.conv.weight"],
                        sd[f"output_blocks.{k}.{sub}.conv.bias"],
                        padding=1,
                    )
                ds //= 2
            k += 1
    return F.conv2d(F.silu(_gn(h, sd, "out.0")), sd["out.2.weight"], sd["out.2.bias"], padding=1)


def _converted(sd, cfg):
    from diffusers import UNet2DModel

    unet = UNet2DModel(**unet_config(cfg)).eval()
    unet.load_state_dict(adm_to_diffusers(sd, cfg), strict=True)
    return unet


@pytest.mark.parametrize("cfg", [IMPROVED, GUIDED], ids=["improved-diffusion", "guided-diffusion"])
def test_the_converted_unet_computes_the_adm_forward(cfg):
    sd = random_adm(cfg)
    unet = _converted(sd, cfg)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 37, 999])
    with torch.no_grad():
        ours = unet(x, t).sample
        ref = reference_forward(sd, cfg, x, t)
    assert ours.shape == (3, 6, 8, 8)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_a_plain_three_way_split_of_qkv_would_be_wrong():
    sd = random_adm(GUIDED)
    mapped = adm_to_diffusers(sd, GUIDED)
    w = sd["middle_block.1.qkv.weight"][..., 0]
    naive_q = w.chunk(3, dim=0)[0]
    assert not torch.allclose(mapped["mid_block.attentions.0.to_q.weight"], naive_q)


def test_deinterleave_takes_each_heads_q_k_v_block():
    # Two heads of size 1: rows are [q0, k0, v0, q1, k1, v1].
    w = torch.arange(6.0)
    q, k, v = deinterleave_qkv(w, heads=2)
    assert q.tolist() == [0.0, 3.0] and k.tolist() == [1.0, 4.0] and v.tolist() == [2.0, 5.0]


def test_convert_adm_writes_a_folder_that_load_denoiser_reads(tmp_path):
    from raysmooth.models import load_denoiser

    sd = random_adm(IMPROVED)
    torch.save(sd, tmp_path / "model.pt")
    folder = convert_adm_checkpoint(tmp_path / "model.pt", tmp_path / "converted", IMPROVED)
    den = load_denoiser({"path": str(folder)})
    assert den.num_timesteps == 4000 and den.timestep_scale == pytest.approx(0.25)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([100])
    with torch.no_grad():
        torch.testing.assert_close(den.unet(x, t).sample, reference_forward(sd, IMPROVED, x, t), rtol=1e-4, atol=1e-4)


def test_a_checkpoint_of_another_layout_is_one_clear_error(tmp_path):
    sd = random_adm(IMPROVED)
    del sd["middle_block.1.qkv.weight"]
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ModelLoadError, match=r"bad\.pt.*missing key.*middle_block\.1\.qkv\.weight"):
        convert_adm_checkpoint(tmp_path / "bad.pt", tmp_path / "out", IMPROVED)


def test_the_real_checkpoints_map_to_the_published_diffusers_layout():
    # No download: the released files' layouts, checked through their configs.
    cifar = unet_config(ADMConfig())
    assert cifar["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"]
    assert cifar["attention_head_dim"] == 64 and cifar["out_channels"] == 6
    imagenet = unet_config(__import__("raysmooth.models.adm", fromlist=["ADM_PRESETS"]).ADM_PRESETS["imagenet256"])
    assert imagenet["down_block_types"] == ["ResnetDownsampleBlock2D"] * 3 + ["AttnDownBlock2D"] * 3
    assert imagenet["block_out_channels"] == [256, 256, 512, 512, 1024, 1024]
    shapes = adm_key_shapes(ADMConfig())
    assert shapes["input_blocks.0.0.weight"] == (128, 3, 3, 3)
    assert shapes["out.2.weight"] == (6, 128, 3, 3)


class Payload:
    """Any object beyond tensors and containers: loading it would run pickled code."""


def test_the_convert_adm_command_refuses_a_pickle_that_is_not_only_tensors(tmp_path, capsys):
    from raysmooth.cli import main

    torch.save({"model": random_adm(IMPROVED), "extra": Payload()}, tmp_path / "evil.pt")
    assert main(["convert-adm", str(tmp_path / "evil.pt"), str(tmp_path / "out"), "--preset", "cifar10"]) == 2
    err = capsys.readouterr().err.strip()
    assert "refused" in err and err.count("\n") == 0
