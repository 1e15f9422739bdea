"""engine.group_norm=channels_last: GroupNorm computed in a channels_last activation's own layout."""

import dataclasses
import logging

import numpy as np
import pytest
import torch
from torch import nn

from raysmooth.config import ConfigError, compose
from raysmooth.engine import EngineConfig, Replica
from raysmooth.errors import InputError
from raysmooth.models.adm import ADM_PRESETS, scheduler_config, timestep_scale, unet_config
from raysmooth.models.base import PlainBase
from raysmooth.models.classifier import InputContract, NormalizedClassifier
from raysmooth.models.denoiser import DiffusionDenoiser
from raysmooth.models.norms import ChannelsLastGroupNorm, set_group_norm
from raysmooth.models.schedule import schedule_from_config
from raysmooth.units import WorkUnit


def _norms(groups: int = 4, channels: int = 16) -> tuple[nn.GroupNorm, ChannelsLastGroupNorm]:
    torch.manual_seed(0)
    native = nn.GroupNorm(groups, channels)
    with torch.no_grad():
        native.weight.normal_()
        native.bias.normal_()
    twin = ChannelsLastGroupNorm(groups, channels)
    twin.load_state_dict(native.state_dict())
    return native, twin


def _channels_last(*shape: int, dtype=torch.float32) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(*shape) * 3 + 1  # an offset and a scale the normalisation must remove
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_it_gives_group_norms_values_on_a_channels_last_input(dtype, tol):
    native, twin = _norms()
    x = _channels_last(2, 16, 8, 8, dtype=dtype)
    native, twin = native.to(dtype), twin.to(dtype)
    with torch.no_grad():
        out = twin(x)
        torch.testing.assert_close(out.float(), native(x).float(), atol=tol, rtol=tol)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "groups, channels, size",
    [(4, 16, (8, 8)), (4, 16, (7, 7)), (32, 256, (6, 6)), (2, 64, (3, 5))],
    ids=["4-chunks", "odd-positions-1-chunk", "adm-groups-2-chunks", "wide-groups-1-chunk"],
)
def test_its_two_step_statistics_are_group_norms_whatever_the_chunking(groups, channels, size):
    """Each channel's statistics over chunks of positions, then each group's from them (the law of total
    variance): float64 GroupNorm's values, also far from zero where a sum of squares would cancel."""
    native, twin = _norms(groups, channels)
    torch.manual_seed(2)
    x = (torch.randn(2, channels, *size) * 3 + 1000).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        exact = native.double()(x.double())
        torch.testing.assert_close(twin(x).double(), exact, atol=2e-4, rtol=0)


def test_a_channel_last_sequence_is_normalised_in_its_layout_too():
    """diffusers' attention blocks normalise (N, C, positions) views of channels_last activations."""
    native, twin = _norms()
    x = _channels_last(2, 16, 8, 8).flatten(2)  # (2, 16, 64), channels innermost in memory
    assert not x.is_contiguous() and x.movedim(1, -1).is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), native(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 16, 8, 8), (2, 16, 1, 1), (3, 16)], ids=["contiguous", "one-position", "2-d"])
def test_other_inputs_take_group_norms_own_path_bit_for_bit(shape):
    native, twin = _norms()
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.equal(twin(x), native(x))


def _traced_ops(norm: nn.Module, x: torch.Tensor) -> list:
    """The ops torch.compile lowers for GroupNorm then SiLU, with inductor's own decompositions, on a
    device that is not the CPU (the meta device: shapes and strides only)."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = make_fx(lambda t: nn.functional.silu(norm(t)), decomposition_table=select_decomp_table())(x)
    return [n for n in graph.graph.nodes if n.op == "call_function"]


def test_pytorchs_decomposition_copies_a_channels_last_input_to_contiguous_and_this_one_does_not():
    """Why the option exists: off the CPU, the GroupNorm that inductor lowers first copies a channels_last
    activation into the contiguous layout (and so hands the next convolution one to transpose back);
    the twin's full-size intermediates all keep the channels innermost."""
    native, twin = (m.to("meta") for m in _norms())
    x = torch.empty(2, 16, 8, 8, device="meta").contiguous(memory_format=torch.channels_last)

    def layout_copies(norm) -> int:
        return sum(
            n.target is torch.ops.aten.clone.default and n.kwargs.get("memory_format") == torch.contiguous_format
            for n in _traced_ops(norm, x)
        )

    def channels_first(norm) -> list:
        """Intermediates of the activation's shape laid out channels-first (contiguous) in memory."""
        vals = [n.meta.get("val") for n in _traced_ops(norm, x)]
        return [v for v in vals if isinstance(v, torch.Tensor) and v.shape == x.shape and v.is_contiguous()]

    assert layout_copies(native) >= 1 and layout_copies(twin) == 0
    assert channels_first(native) and channels_first(twin) == []


def test_switching_keeps_every_parameter_and_state_dict_key_and_switches_back():
    unet, _ = _toy_unet()
    keys = list(unet.state_dict())
    count = sum(type(m) is nn.GroupNorm for m in unet.modules())
    assert count > 0 and set_group_norm(unet, "channels_last") == count
    assert list(unet.state_dict()) == keys
    assert not any(type(m) is nn.GroupNorm for m in unet.modules())
    assert set_group_norm(unet, "native") == count
    assert all(type(m) is not ChannelsLastGroupNorm for m in unet.modules())


def test_a_subclass_of_group_norm_keeps_its_own_forward():
    class MyNorm(nn.GroupNorm):
        pass

    model = nn.Sequential(MyNorm(2, 4), nn.GroupNorm(2, 4))
    assert set_group_norm(model, "channels_last") == 1
    assert type(model[0]) is MyNorm and type(model[1]) is ChannelsLastGroupNorm


def test_an_unknown_group_norm_kind_is_refused():
    with pytest.raises(ValueError, match="native, channels_last"):
        set_group_norm(nn.GroupNorm(2, 4), "fused")


def _toy_unet():
    """guided-diffusion's ADM layout at toy size, as the ImageNet pair's denoiser."""
    from diffusers import UNet2DModel

    shrunk = dict(image_size=16, model_channels=32, channel_mult=[1, 2], num_res_blocks=1, num_head_channels=16)
    adm = dataclasses.replace(ADM_PRESETS["imagenet256"], **shrunk, attention_resolutions=[8])
    torch.manual_seed(0)
    return UNet2DModel(**unet_config(adm)).eval(), adm


def test_a_compiled_channels_last_unet_is_one_graph_with_the_eager_outputs():
    """The ADM layout in channels_last, its GroupNorms switched, compiled whole (fullgraph): the same
    denoised images as PyTorch's GroupNorm eager, to float rounding."""
    unet, adm = _toy_unet()
    denoiser = DiffusionDenoiser(unet, schedule_from_config(scheduler_config(adm)), timestep_scale=timestep_scale(adm))
    denoiser = denoiser.to(memory_format=torch.channels_last)
    z = torch.rand(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    sigma = torch.full((4,), 0.25)
    with torch.inference_mode():
        expected = denoiser(z, sigma)
        assert set_group_norm(denoiser, "channels_last") > 0
        torch._dynamo.reset()
        got = torch.compile(denoiser, fullgraph=True)(z, sigma)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_without_compile_or_channels_last_the_option_is_refused_in_the_engine_and_the_config(tmp_path):
    for engine in (dict(compile=False, channels_last=True), dict(compile=True, channels_last=False)):
        with pytest.raises(InputError, match="needs engine.compile=true and engine.channels_last=true"):
            EngineConfig(group_norm="channels_last", **engine)
    with pytest.raises(InputError, match="native, channels_last"):
        EngineConfig(group_norm="fused", compile=True, channels_last=True)
    with pytest.raises(ConfigError, match="engine.group_norm=channels_last needs"):
        compose("certify", ["engine.group_norm=channels_last"])
    ok = compose("certify", ["engine=gpu_compiled", "engine.group_norm=channels_last"]).engine
    assert (ok.group_norm, ok.compile, ok.channels_last) == ("channels_last", True, True)


def _conv_norm_base() -> PlainBase:
    """A convolution, one GroupNorm, SiLU and a linear head on 3×8×8 images: quick to compile."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(), nn.Flatten(), nn.Linear(32 * 64, 10)
    )
    contract = InputContract((8, 8), "bilinear", (0.5,) * 3, (0.5,) * 3)
    return PlainBase(NormalizedClassifier(net.eval(), contract, 10), (3, 8, 8))


def test_a_replica_switches_its_model_and_counts_exactly_as_with_pytorchs_group_norm(caplog):
    """On a CPU the activations stay contiguous, so the switched layers take GroupNorm's own path: the
    same counts to the vote, and the log says why nothing else changes."""
    base = _conv_norm_base()
    images = {i: np.random.default_rng(i).random((3, 8, 8), dtype=np.float32) for i in range(2)}
    units = [WorkUnit(i, 0, "estimation", 0, 200) for i in images]
    counts = {}
    for kind in ("native", "channels_last"):
        cfg = EngineConfig(batch_size=64, compile=True, channels_last=True, group_norm=kind)
        with caplog.at_level(logging.INFO, logger="raysmooth"):
            replica = Replica(base, [0.25], 0, cfg)
        counts[kind] = replica.run(units, images)
    switched = sum(type(m) is ChannelsLastGroupNorm for m in replica.base.modules())
    assert switched == 1
    assert "1 GroupNorm layers switched (on cpu activations stay contiguous" in caplog.text
    assert all(np.array_equal(counts["native"][u.key], counts["channels_last"][u.key]) for u in units)
    Replica(base, [0.25], 0, EngineConfig(batch_size=64))  # a later native replica switches it back
    assert not any(type(m) is ChannelsLastGroupNorm for m in base.modules())


def test_a_replica_whose_compile_fails_goes_back_to_pytorchs_group_norm(caplog):
    """Eager, the twin would build float32 copies of every activation: a replica left eager by a failed
    compile runs PyTorch's GroupNorm."""
    base = _conv_norm_base()
    cfg = EngineConfig(batch_size=64, compile=True, channels_last=True, group_norm="channels_last")
    replica = Replica(base, [0.25], 0, cfg)

    def unbuildable(*args):
        raise RuntimeError("backend='inductor' raised: the GPU is too old for Triton")

    replica._forward = unbuildable
    images = {0: np.random.default_rng(0).random((3, 8, 8), dtype=np.float32)}
    with caplog.at_level("WARNING", logger="raysmooth"):
        counts = replica.run([WorkUnit(0, 0, "estimation", 0, 50)], images)
    assert sum(int(c.sum()) for c in counts.values()) == 50 and "torch.compile failed" in caplog.text
    assert replica.config.group_norm == "native"
    assert not any(type(m) is ChannelsLastGroupNorm for m in base.modules())
