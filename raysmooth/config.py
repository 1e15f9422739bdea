"""Typed configs: the schemas hydra checks every YAML and override against, and the one place that
checks what a type cannot (ranges, choices, paths).

Composition gives a typed object (``OmegaConf.to_object``) that is validated once, here, at the
edge; everything after works with attributes, never with string-keyed dicts. A mistake is one
``ConfigError`` line that names the key. No torch on this import path: ``raysmooth sweep`` and
``raysmooth analyze`` start in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import shlex
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PATH_KEYS, ConfigError, UserError, check_paths_given, one_line

__all__ = [
    "CONFIG_DIR",
    "REPO_ROOT",
    "DEFAULT_RADII",
    "DataCfg",
    "ModelCfg",
    "SmoothingCfg",
    "EngineCfg",
    "RayCfg",
    "CertifyCfg",
    "SweepCfg",
    "FinetuneConfig",
    "register_configs",
    "compose",
    "typed",
    "validate_certify",
    "validate_sweep",
    "compile_settings_problem",
    "resolve_path",
    "resolve_model_paths",
    "load_model_option",
    "counts_relevant_config",
    "override_text",
    "parse_range",
    "parse_floats",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_RADII = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
# engine.attention: timm's SDPA call, the same with the bias computed once per replica (batched by sample
# or by head), or FlexAttention (raysmooth.models.attention)
ATTENTION_KERNELS = ("sdpa", "sdpa_cached", "sdpa_by_head", "flex")
# engine.group_norm: PyTorch's GroupNorm, or the same computed in a channels_last activation's own
# layout (raysmooth.models.norms)
GROUP_NORM_KINDS = ("native", "channels_last")
# engine.gelu: a transformer MLP's GELU as a pass of its own, or in its first matmul's epilogue
# (raysmooth.models.mlp)
GELU_KINDS = ("native", "epilogue")
# engine.compile_mode: torch.compile's modes (torch._inductor.list_mode_options). max-autotune benchmarks
# Triton templates for every matmul and convolution at compile time; the cudagraphs modes replay each
# static-shape batch as one CUDA graph (docs/performance.md).
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
DEFAULT_BATCH_SIZE = 1000  # samples per forward pass when neither the engine nor the model config says
GIVE_UP_AFTER_S = 600.0  # a run stops (resumably) when no actor has finished a task for this long
REPORT_METHODS = ("certify", "cascade", "predict", "sequential")  # the methods of the job's certificate rows


# ---- schemas --------------------------------------------------------------------------------------
@dataclass
class DataCfg:
    name: str = "digits"
    split: str = "test"
    root: str | None = None  # dataset folder (CIFAR-10 batches, ImageNet val, an image folder)
    skip: int = 1  # every k-th image, as the papers subsample
    max_images: int | None = None
    indices: list[int] | None = None  # these test-set indices exactly (data.skip does not apply to them)
    options: dict[str, Any] = field(default_factory=dict)  # loader-specific (synthetic: num_images, shape …)


@dataclass
class ModelCfg:
    """A base classifier: a registered name (plain, dds, diffsmooth, onestep, linear) or an import path
    ``pkg.module:builder`` to your own ``nn.Module``, and the sections its builder takes."""

    name: str = "model"  # the run directory's name under `out`
    base: str = "???"  # required: every configs/model/ file names one (custom leaves it to the command line)
    input_shape: list[int] = field(default_factory=lambda: [1, 8, 8])
    batch_size: int | None = None  # samples per forward pass that suit this model (engine.batch_size wins)
    denoiser: dict[str, Any] | None = None  # DenoiserConfig fields, or {path: a diffusers folder}
    classifier: dict[str, Any] | None = None  # ClassifierConfig fields, or {path: a classifier folder}
    onestep: dict[str, Any] | None = None  # OneStepConfig fields, or {path: a one-step model folder}
    options: dict[str, Any] = field(default_factory=dict)  # builder extras (diffsmooth: local_sigma …)


@dataclass
class SequentialCfg:
    """smoothing.mode=sequential (docs/sequential.md): rounds of whole units, looked at on a doubling
    schedule, stopped once the answer at the radius grid is settled. Every key changes which rounds
    are sampled, so all enter the run's identity."""

    unit: int = 125  # samples per estimation unit: round k is the units between looks k-1 and k
    n_max: int = 100_000  # the last look (a multiple of unit)
    look_ratio: float = 2.0  # N_k = unit * ceil(look_ratio^(k-1)) while below n_max
    alpha_spending: str = "half_final"  # half_final: alpha/2 on the last look | uniform
    radii: list[float] | None = None  # the decision grid; None: the report radii (`radii`)
    futility_beta: float = 0.05  # futility upper bounds at this level (power and cost only, never validity)
    precision: float | None = None  # mode ii: stop when the radius interval is this many σ wide
    r_cap: float | None = None  # mode ii: radii above this need not be resolved
    stop: str = "rule"  # rule | never (audit: sample every look to n_max, store rounds separately)


@dataclass
class SmoothingCfg:
    sigmas: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    chunk: int = 10_000  # split each budget into units of at most this many samples
    mode: str = "full"  # full: every σ for every image; cascade: lazily, largest σ first; sequential
    p0: list[float] = field(default_factory=lambda: [0.5])  # cascade thresholds to report
    policies: list[str] = field(default_factory=lambda: ["strict", "reference"])
    seed: int = 0
    sequential: SequentialCfg = field(default_factory=SequentialCfg)


@dataclass
class EngineCfg:
    batch_size: int | str | None = None  # None: the model's own; an int; or "auto" (probe the device)
    noise_block: int = 256  # part of the noise definition: changing it changes the counts
    precision: str = "fp32"  # fp32 | bf16 | fp16 (model and activations) | bf16-mixed (autocast)
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"  # torch.compile's mode: default | max-autotune[-no-cudagraphs] | reduce-overhead
    attention: str = "sdpa"  # sdpa | sdpa_cached | sdpa_by_head | flex (needs compile): BEiT's biased attention
    group_norm: str = "native"  # native | channels_last (needs compile): the layout GroupNorm computes in
    gelu: str = "native"  # native | epilogue: a transformer MLP's GELU as its own pass or in fc1's matmul
    noise: str = "gaussian"  # gaussian | lattice (sound in floating point; needs quantised images)
    levels: int = 255  # lattice noise: the images' quantisation (x·levels is an integer)
    device: str = "auto"  # auto: cuda when the actor has a GPU, else cpu


@dataclass
class RayCfg:
    address: str | None = None  # None: the job's cluster (RAY_ADDRESS) or a local one
    num_actors: int | None = None  # None: one per GPU, or one per CPU slot when there are no GPUs
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    max_in_flight_per_actor: int = 2
    samples_per_task: int = 4000  # units are grouped into tasks of about this many samples
    max_restarts: int = -1
    task_timeout_s: float | None = None  # re-queue a task that takes longer (hung or pending actor)
    give_up_after_s: float = GIVE_UP_AFTER_S  # stop (resumably) when no actor has finished a task for this long
    local_cpus: int | None = None  # CPUs of a local cluster started by the job


@dataclass
class CertifyCfg:
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    smoothing: SmoothingCfg = field(default_factory=SmoothingCfg)
    engine: EngineCfg = field(default_factory=EngineCfg)
    ray: RayCfg = field(default_factory=RayCfg)
    compare: list[str] = field(default_factory=list)  # more model configs certified beside `model`
    out: str = "runs/${data.name}"
    report_methods: list[str] = field(default_factory=lambda: ["certify", "cascade"])
    radii: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5])
    plot: bool = True
    flush_every: int = 200  # commit counts after this many finished rows …
    flush_seconds: float = 30.0  # … or this many seconds
    progress_seconds: float = 10.0  # a progress line (images done, samples/s, ETA) this often, in a log


@dataclass
class SweepCfg:
    run_dir: str = "???"
    p0: str = "0.5:0.95:0.05"  # START:STOP:STEP, one value, or several comma-separated
    alpha: list[float] | None = None  # None: the α the run was certified at
    policy: str = "strict"
    radii: list[float] = field(default_factory=lambda: list(DEFAULT_RADII))


@dataclass
class FinetuneConfig:
    """Diffusion fine-tuning of a denoiser against a frozen classifier (``raysmooth finetune``)."""

    denoiser: dict[str, Any] = field(default_factory=lambda: {"path": "raysmooth/embedded/digits/denoiser"})
    classifier: dict[str, Any] = field(default_factory=lambda: {"path": "raysmooth/embedded/digits/classifier"})
    data: str = "digits"  # training split of this data set
    sigmas: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    draws: int = 4  # m ≥ 2 noise draws per image
    brier_weight: float = 1.0
    anti_consistency_weight: float = 1.0  # λ
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    lora_rank: int | None = None  # None: full fine-tuning; otherwise LoRA adapters of this rank (peft)
    lora_targets: list[str] = field(default_factory=lambda: ["conv1", "conv2", "to_q", "to_k", "to_v"])
    seed: int = 0
    checkpoint_every: int = 200
    threads: int | None = None
    out: str = "runs/finetune"

    def validate(self) -> None:
        if self.draws < 2:
            raise ConfigError(f"finetune.draws must be at least 2, got {self.draws}")
        if not self.sigmas or any(not (math.isfinite(s) and s > 0) for s in self.sigmas):
            raise ConfigError(f"finetune.sigmas must be one or more positive finite numbers, got {self.sigmas}")
        # σ are drawn uniformly from the list: one listed twice would be trained on twice as often, silently
        _check("finetune.sigmas", len(set(self.sigmas)) == len(self.sigmas), f"lists a σ twice: {self.sigmas}")
        for key in ("steps", "batch_size", "checkpoint_every"):
            _check(f"finetune.{key}", getattr(self, key) >= 1, f"must be at least 1, got {getattr(self, key)}")
        _check("finetune.threads", self.threads is None or self.threads >= 1, f"must be at least 1, got {self.threads}")
        # An infinite lr or a NaN weight trains a denoiser of NaNs, saved as if it were fine.
        # AdamW moves each weight by about lr per step: past 1 nothing useful is left, and an lr past
        # float32's range is a RuntimeError inside the optimizer.
        _check("finetune.lr", _finite(self.lr) and 0 < self.lr <= 1, f"must lie in (0, 1], got {self.lr}")
        _check(
            "finetune.weight_decay",
            _finite(self.weight_decay) and self.weight_decay >= 0,
            f"must be a non-negative finite number, got {self.weight_decay}",
        )
        weights = (self.brier_weight, self.anti_consistency_weight)
        if not all(_finite(w) and w >= 0 for w in weights) or not any(w > 0 for w in weights):
            raise ConfigError(
                "finetune.brier_weight and anti_consistency_weight must be non-negative finite numbers, "
                f"not both 0 (nothing would be learned), got {weights[0]} and {weights[1]}"
            )
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ConfigError("finetune.lora_rank must be at least 1 (or null for full fine-tuning)")
        if self.lora_rank is None and list(self.lora_targets) != FinetuneConfig().lora_targets:
            raise ConfigError(  # ignored, they would train every weight while the user asked for a few
                f"finetune.lora_targets={list(self.lora_targets)} would be ignored: with lora_rank null every "
                "weight is fine-tuned; give finetune.lora_rank (e.g. 4) to train LoRA adapters on those modules"
            )
        _check_out(self.out)


_SCHEMAS: dict[str, type] = {"certify": CertifyCfg, "sweep": SweepCfg, "finetune": FinetuneConfig}


def register_configs() -> None:
    """Register the schemas with hydra's ConfigStore (YAMLs name them in their defaults lists)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    for name, node in _SCHEMAS.items():
        cs.store(name=f"{name}_schema", node=node)  # types every group too; no group holds a `schema` option
    if not OmegaConf.has_resolver("expanduser"):
        # hydra's own folders follow `out`: RAYSMOOTH_OUT="~/runs" (quoted, so no shell expanded it) put the
        # results under the home folder and hydra's records in a folder named "~" in the working directory
        OmegaConf.register_new_resolver("expanduser", lambda path: os.path.expanduser(str(path)))


# ---- composition --------------------------------------------------------------------------------
def _first_sentence(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    # OmegaConf puts the useful sentence first and the key path in a 'full_key:' line.
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), None)
    head = next(
        (ln for ln in lines if not ln.startswith(("full_key:", "object_type", "reference_type", "To append"))),
        type(exc).__name__,
    )
    return f"{head} (key: {key})" if key and key not in head else head


def hydra_error_line(exc: BaseException, config_name: str | None = None) -> str:
    """Hydra's message and, where it wraps one, OmegaConf's reason, on one line; with ``config_name``,
    the key the user probably meant when the one given does not exist."""
    if (parse := _override_parse_hint(exc)) is not None:
        return parse
    text = _first_sentence(exc)
    cause = exc.__cause__ or exc.__context__
    if cause is not None and type(cause).__module__.startswith(("omegaconf", "hydra")):
        reason = _first_sentence(cause)
        text = text if reason in text else f"{text.rstrip('.')}: {reason}"
    return _with_hint(text, config_name)


def override_text(key: str, value: object) -> str:
    """``key=value`` as one shell word hydra reads back as ``value``: a path holding ``=`` (a ``-m`` job's
    folder, ``out/lr=0.001``), a space or a bracket is quoted, which hydra's grammar needs."""
    text = str(value)
    if re.fullmatch(r"[A-Za-z0-9_/\-+.%@]+", text):
        return f"{key}={text}"
    # inside hydra's quotes only a backslash before a quote or at the end is an escape
    escaped = re.sub(r'(\\+)(?="|$)', lambda m: m.group(1) * 2, text).replace('"', '\\"')
    return shlex.quote(f'{key}="{escaped}"')


def _override_parse_hint(exc: BaseException) -> str | None:
    """Hydra's parse error of one override names neither the override nor what to write: a value holding
    ``=``, ``~``, a space or a bracket must be quoted as a whole."""
    override = getattr(exc, "override", None)
    if type(exc).__name__ != "OverrideParseException" or not override:
        return None
    lines = str(getattr(exc, "message", exc)).splitlines()
    reason = next((ln.strip() for ln in lines if " input " in ln), "")
    if lines and lines[0].startswith("LexerNoViableAltException") and len(lines) > 1 and "^" in lines[1]:
        at = lines[1].index("^")  # the caret line points into the first line
        reason = f"{lines[0][at]!r} is not allowed bare" if at < len(lines[0]) else ""
    key, eq, value = str(override).partition("=")
    if not eq:  # a word that is no override at all (a flag after `--` is read as one)
        after = "; a flag after `--` is read as an override" if key.startswith("-") else ""
        return f"cannot read {override!r}: an override is key=value{after}"
    head = f"cannot read the override {override!r}" + (f" ({reason})" if reason else "")
    if value.lstrip().startswith(("[", "{")):
        return f"{head}; lists are written key=[a,b] and dicts key={{a:1}}, an item holding brackets or commas quoted"
    return f"{head}; quote the value as a whole: {override_text(key, value)}"


def _with_hint(text: str, config_name: str | None) -> str:
    """Hydra's message with what to write instead, for the mistakes its wording leaves a user stuck on."""
    unknown = re.match(r"Could not override '([^']+)'.* not in '", text)
    if unknown and config_name in _SCHEMAS:
        text += _did_you_mean(unknown.group(1), _SCHEMAS[config_name])
    if config_name == "finetune" and re.match(r"Could not override 'data'", text):
        # configs/data/ makes `data` a config group on the command line; fine-tuning reads one set anyway
        text += " (raysmooth finetune trains on the digits training split; finetune.data is not a choice yet)"
    missing = re.search(r"Could not find '(\w+)/([^']+)'", text)
    if missing and (CONFIG_DIR / missing.group(1)).is_dir():
        options = sorted(p.stem for p in (CONFIG_DIR / missing.group(1)).glob("*.yaml"))
        text += f" ({missing.group(1)}= takes one of {', '.join(options)}"
        text += ", or data.name=image_folder for a tree of class folders)" if missing.group(1) == "data" else ")"
    present = re.match(r"Could not append to config\. An item is already at '([^']+)'", text)
    if present:
        text = f"{text.rstrip('.')}; set it without the +: {present.group(1)}=…"
    unset = re.search(r"is not in struct \(key: ([\w.]+)\)", text)
    if unset:
        text += f"; a key this section does not hold yet is added with a +: +{unset.group(1)}=…"
    mandatory = re.search(r"missing mandatory value: (\w+)(?: \(key: ([\w.]+)\))?", text)
    if mandatory:
        key = mandatory.group(2) or mandatory.group(1)  # a top-level key is named once, without "(key: …)"
        example = {"model.base": "=pkg.module:builder", "run_dir": "=RUN_DIR"}.get(key, "=…")
        text += f"; give it on the command line: {key}{example}"
    listed = re.search(r"is not a ListConfig, list or tuple.*\(key: ([\w.]+)\)", text)
    if listed:
        text += f"; {listed.group(1)} is a list: {listed.group(1)}=[…]"
    whole = re.search(r"Value '([^']+)' of type 'float' could not be converted to Integer \(key: ([\w.]+)\)", text)
    if whole:  # the Python API takes n=1e5; hydra's typed int does not, and does not say what would do
        key, value = whole.group(2), float(whole.group(1))
        text += f"; {key} takes a whole number, written without an exponent or a point"
        if _finite(value) and value == int(value):
            text += f": {key}={int(value)}" + (f" (or {int(value):_})" if abs(value) >= 10_000 else "")
    return text


def _schema_keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key of a schema dataclass (the keys of its open dicts are the user's)."""
    keys = []
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(default):
            keys += _schema_keys(type(default), f"{prefix}{f.name}.")
    return keys


def _did_you_mean(key: str, schema: type) -> str:
    """' (did you mean smoothing.seed?)' for 'seed', from the schema's keys: the closest spelling beside
    it (smoothing.aplha → smoothing.alpha), else the same name elsewhere (seed → smoothing.seed)."""
    keys = _schema_keys(schema)
    parent, _, last = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
    close = [siblings[m] for m in difflib.get_close_matches(last, list(siblings), n=1, cutoff=0.75)]
    close = close or [k for k in keys if k != key and k.rpartition(".")[2] == last]
    return f" (did you mean {' or '.join(close[:2])}?)" if close else ""


def unknown_keys(node: Any, prefix: str = "") -> list[str]:
    """Keys of a composed config that its schema does not have: ``+key=value`` adds them, and
    ``OmegaConf.to_object`` drops them without a word, so a mistyped ``+smoothing.seed2=1`` would run
    the default silently. Keys under open dicts (``model.options``, ``model.classifier`` …) are the
    user's and not checked."""
    from omegaconf import DictConfig, OmegaConf

    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return []
    names = {f.name for f in dataclasses.fields(schema)}
    found = []
    for key in node.keys():
        if key not in names:
            found.append(f"{prefix}{key}")
        elif not OmegaConf.is_missing(node, key) and isinstance(child := node.get(key), DictConfig):
            found += unknown_keys(child, f"{prefix}{key}.")
    return found


def is_hydra_error(exc: BaseException) -> bool:
    return type(exc).__module__.startswith(("hydra", "omegaconf"))


def _unset_section(overrides: Sequence[str], exc: BaseException) -> str | None:
    """OmegaConf cannot set a key inside a section that is null (``model.denoiser`` of a one-step
    model): it fails with an assertion about NoneType. Name the section instead."""
    if "NoneType" not in str(exc):
        return None
    for override in overrides:
        found = re.match(r"\+*(model\.(denoiser|classifier|onestep))[.=]", override)
        if found:
            return (
                f"{override}: this model config has no {found.group(1)} section (a base classifier that "
                "takes one names it in its configs/model/ file, as toy_dds and custom do)"
            )
    return None


def compose(config_name: str, overrides: Sequence[str] = (), config_dir: Path | None = None):
    """The typed, validated config of ``configs/<config_name>.yaml`` with ``overrides`` (hydra's compose
    API: what the tests and the Python API use; the jobs get the same object through ``@hydra.main``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir or CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    except Exception as exc:  # composing reads only configs and overrides: whatever fails is a config mistake
        text = (
            hydra_error_line(exc, config_name)
            if is_hydra_error(exc) or isinstance(exc, (ValueError, KeyError))
            else _unset_section(overrides, exc)
            or f"cannot apply the overrides {list(overrides)} ({type(exc).__name__}: {one_line(exc)})"
        )
        raise ConfigError(text) from None
    return typed(cfg, config_name)


def typed(cfg: Any, config_name: str):
    """``OmegaConf.to_object`` of a composed config (interpolations resolved, ``???`` refused), then
    the one validation of every value."""
    from omegaconf import DictConfig, OmegaConf

    obj = cfg
    if isinstance(cfg, DictConfig):
        extra = unknown_keys(cfg)
        if extra:
            schema = _SCHEMAS.get(config_name)
            hint = _did_you_mean(extra[0], schema) if schema else ""
            raise ConfigError(f"{extra[0]} is no key of raysmooth {config_name}{hint}; nothing would read it")
        try:
            obj = OmegaConf.to_object(cfg)
        except Exception as exc:
            if is_hydra_error(exc):
                raise ConfigError(hydra_error_line(exc)) from None
            raise
    {"certify": validate_certify, "sweep": validate_sweep, "finetune": FinetuneConfig.validate}[config_name](obj)
    return obj


# ---- validation (once, at the edge) --------------------------------------------------------------
def _check(key: str, ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")


def compile_settings_problem(
    compile: bool, compile_mode: str, attention: str, group_norm: str, channels_last: bool, gelu: str = "native"
) -> str | None:
    """What is wrong with the engine's compile settings, as one line naming the key (None: nothing).
    The config check and the engine both ask here, so a job and ``Smoothed`` refuse the same things."""
    if attention not in ATTENTION_KERNELS:
        return f"engine.attention must be one of {', '.join(ATTENTION_KERNELS)}, got {attention!r}"
    if compile_mode not in COMPILE_MODES:
        return f"engine.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}"
    if group_norm not in GROUP_NORM_KINDS:
        return f"engine.group_norm must be one of {', '.join(GROUP_NORM_KINDS)}, got {group_norm!r}"
    if gelu not in GELU_KINDS:
        return f"engine.gelu must be one of {', '.join(GELU_KINDS)}, got {gelu!r}"
    if attention == "flex" and not compile:
        return "engine.attention=flex needs engine.compile=true (uncompiled, FlexAttention runs unfused and slower)"
    if group_norm == "channels_last" and not (compile and channels_last):
        return (
            "engine.group_norm=channels_last needs engine.compile=true and engine.channels_last=true (it "
            "computes GroupNorm in channels_last activations; uncompiled, its passes run unfused)"
        )
    if compile_mode != "default" and not compile:
        return f"engine.compile_mode={compile_mode} needs engine.compile=true (it says how to compile)"
    return None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _stats_check(key: str, fn: Callable[[], Any]) -> None:
    """Run a ``raysmooth.stats`` check; its plain ``ValueError`` becomes the line that names ``key``."""
    try:
        fn()
    except ValueError as exc:
        text, last = str(exc), key.rsplit(".", 1)[-1]
        raise ConfigError(f"{key}{text[len(last) :]}" if text.startswith(last + " ") else f"{key}: {text}") from None


LARGE_SIGMA = 2.0  # in [0, 1] pixel units: noise this large swamps the whole pixel range several times over


def distinct_in_float32(sigmas: Sequence[float]) -> bool:
    """The noise is drawn as float32(σ): two σ equal there would be one level counted twice."""
    return len({float(np.float32(s)) for s in sigmas}) == len(sigmas)


def large_sigma_warning(sigmas: Sequence[float]) -> str | None:
    """A σ above ``LARGE_SIGMA`` is most likely meant in 0-255 units: its certificates are valid but of a
    classifier that sees almost only noise, with radii that look spectacular. Said, not refused."""
    big = [float(s) for s in sigmas if s > LARGE_SIGMA]
    if not big:
        return None
    return (
        f"σ = {', '.join(f'{s:g}' for s in big)} in [0, 1] pixel units is noise {max(big):g}x the whole pixel "
        "range; if σ was meant in 0-255 units, divide it by 255 (radii are in [0, 1] units too)"
    )


def fits_int64(value: int) -> bool:
    """Whether an int fits the store's int64 columns (every counts row stores its run's seed and image id)."""
    return -(2**63) <= value < 2**63


def lazy_cascade_note(sm: SmoothingCfg) -> str | None:
    """``mode=cascade`` samples a lower σ only where one decision rule leaves an image open, so only that
    rule (the first p0 and policy) has the counts it needs; the others listed are not reported."""
    if sm.mode != "cascade" or (len(sm.p0) <= 1 and len(sm.policies) <= 1):
        return None
    dropped = [f"p0={p:g}" for p in sm.p0[1:]] + [f"policy {p}" for p in sm.policies[1:]]
    return (
        f"samples for one decision rule, p0={sm.p0[0]:g} with the {sm.policies[0]} policy (the first of each); "
        f"{', '.join(dropped)} are not reported: they need counts a lazy cascade does not draw "
        "(smoothing.mode=full stores every σ for every image, and raysmooth sweep then gives any p0)"
    )


def validate_certify(cfg: CertifyCfg) -> None:
    from . import stats
    from .data import check_names

    sm, en, ry, da, mo = cfg.smoothing, cfg.engine, cfg.ray, cfg.data, cfg.model
    _check(
        "smoothing.sigmas",
        bool(sm.sigmas) and all(_finite(s) and s > 0 for s in sm.sigmas),
        f"must be positive finite numbers, got {sm.sigmas}",
    )
    _check("smoothing.sigmas", len(set(sm.sigmas)) == len(sm.sigmas), f"lists a σ twice: {sm.sigmas}")
    _check("smoothing.n0", sm.n0 >= 1, f"must be at least 1, got {sm.n0}")
    _check("smoothing.n", sm.n >= 1, f"must be at least 1, got {sm.n}")
    _stats_check("smoothing.alpha", lambda: stats.check_alpha(sm.alpha))
    _check("smoothing.chunk", sm.chunk >= 1, f"must be at least 1, got {sm.chunk}")
    for key in ("n0", "n"):  # the stored counts are int64
        _check(f"smoothing.{key}", fits_int64(getattr(sm, key)), f"must be below 2**63, got {getattr(sm, key)}")
    _check("smoothing.seed", fits_int64(sm.seed), f"must fit in 64 bits (the stored seed column), got {sm.seed}")
    _check(
        "smoothing.mode",
        sm.mode in ("full", "cascade", "sequential"),
        f"must be full, cascade or sequential, got {sm.mode!r}",
    )
    _check("smoothing.p0", bool(sm.p0), "needs at least one threshold")
    for p in sm.p0:
        _stats_check("smoothing.p0", lambda p=p: stats.check_p0(p))
    _check(
        "smoothing.policies",
        bool(sm.policies) and all(p in stats.POLICIES for p in sm.policies),
        f"must be among {stats.POLICIES}, got {sm.policies}",
    )
    # A value listed twice would store its certificates twice, and the report would pool them into
    # one row of twice the images.
    _check_distinct("smoothing.p0", sm.p0)
    _check_distinct("smoothing.policies", sm.policies)
    _check("smoothing.mode=cascade", sm.mode != "cascade" or len(sm.sigmas) >= 2, "needs two or more σ")
    if sm.mode == "sequential":
        _check_sequential(sm.sequential, cfg.radii)

    bs = en.batch_size
    _check(
        "engine.batch_size",
        bs is None or bs == "auto" or (isinstance(bs, int) and bs >= 1),
        f"must be a positive integer, auto or null, got {bs!r}",
    )
    _check("engine.noise_block", en.noise_block >= 1, f"must be at least 1, got {en.noise_block}")
    _check(
        "engine.precision",
        en.precision in ("fp32", "bf16", "fp16", "bf16-mixed"),
        f"must be fp32, bf16, fp16 or bf16-mixed, got {en.precision!r}",
    )
    _check("engine.noise", en.noise in ("gaussian", "lattice"), f"must be gaussian or lattice, got {en.noise!r}")
    problem = compile_settings_problem(
        en.compile, en.compile_mode, en.attention, en.group_norm, en.channels_last, en.gelu
    )
    if problem:
        raise ConfigError(problem)
    _check("engine.levels", 1 <= en.levels <= 65535, f"must lie in [1, 65535], got {en.levels}")
    _check(
        "engine.device",
        en.device == "auto" or en.device.split(":")[0] in ("cpu", "cuda", "mps"),
        f"must be auto, cpu or cuda[:N], got {en.device!r}",
    )

    _check("ray.num_actors", ry.num_actors is None or ry.num_actors >= 1, f"must be at least 1, got {ry.num_actors}")
    _check(
        "ray.cpus_per_actor",
        _finite(ry.cpus_per_actor) and ry.cpus_per_actor >= 0,
        f"must be >= 0, got {ry.cpus_per_actor}",
    )
    _check(
        "ray.gpus_per_actor",
        _finite(ry.gpus_per_actor) and ry.gpus_per_actor >= 0,
        f"must be >= 0, got {ry.gpus_per_actor}",
    )
    _check(  # with neither, one actor "per CPU slot" is unbounded: the job tried to start 2 billion of them
        "ray.cpus_per_actor",
        ry.num_actors is not None or ry.cpus_per_actor > 0 or ry.gpus_per_actor > 0,
        "and ray.gpus_per_actor are both 0, which leaves nothing to count the actors by: set ray.num_actors, "
        "or give each actor a CPU (ray.cpus_per_actor=1)",
    )
    _check(
        "ray.max_in_flight_per_actor",
        ry.max_in_flight_per_actor >= 1,
        f"must be at least 1, got {ry.max_in_flight_per_actor}",
    )
    _check("ray.samples_per_task", ry.samples_per_task >= 1, f"must be at least 1, got {ry.samples_per_task}")
    _check("ray.give_up_after_s", _finite(ry.give_up_after_s) and ry.give_up_after_s > 0, "must be positive")
    _check(
        "ray.max_restarts", ry.max_restarts >= -1, f"must be -1 (restart without limit) or more, got {ry.max_restarts}"
    )
    _check(
        "ray.local_cpus",
        ry.local_cpus is None or ry.local_cpus >= 1,
        f"must be at least 1, or null for every CPU of this machine; got {ry.local_cpus}",
    )
    _check(
        "ray.task_timeout_s",
        ry.task_timeout_s is None or (_finite(ry.task_timeout_s) and ry.task_timeout_s > 0),
        "must be positive or null",
    )

    _check("data.skip", da.skip >= 1, f"must be at least 1, got {da.skip}")
    _check("data.max_images", da.max_images is None or da.max_images >= 1, f"must be at least 1, got {da.max_images}")
    _check("data.indices", da.indices is None or len(da.indices) > 0, "is empty: name at least one image, or null")
    _check(
        "data.indices",
        da.indices is None or min(da.indices) >= 0,
        f"must be image indices (0 or more), got {da.indices}",
    )
    repeated = sorted(i for i, k in Counter(da.indices or []).items() if k > 1)
    _check(
        "data.indices", not repeated, f"lists {', '.join(map(str, repeated[:3]))} more than once: name each image once"
    )
    check_names(da)
    _check(
        "data.max_images",
        da.indices is None or da.max_images is None,
        "and data.indices both choose the images: give one of them",
    )
    _check(
        "model.input_shape",
        len(mo.input_shape) == 3 and all(s >= 1 for s in mo.input_shape),
        f"must be (C, H, W), got {mo.input_shape}",
    )
    _check("model.batch_size", mo.batch_size is None or mo.batch_size >= 1, f"must be at least 1, got {mo.batch_size}")
    _check(
        "model.name",
        bool(mo.name) and "/" not in mo.name and mo.name not in (".", ".."),
        f"must be a plain folder name, got {mo.name!r}",
    )
    _check("flush_every", cfg.flush_every >= 1, f"must be at least 1, got {cfg.flush_every}")
    _check(
        "flush_seconds",
        _finite(cfg.flush_seconds) and cfg.flush_seconds > 0,
        f"must be a positive number of seconds, got {cfg.flush_seconds}",
    )
    _check(
        "progress_seconds",
        _finite(cfg.progress_seconds) and cfg.progress_seconds > 0,
        f"must be a positive number of seconds, got {cfg.progress_seconds}",
    )
    _check_out(cfg.out)
    _check_not_in_a_run(cfg.out)
    _check(
        "radii",
        bool(cfg.radii) and all(_finite(r) and r >= 0 for r in cfg.radii),
        f"must be non-negative numbers, at least one (0 gives the clean accuracy), got {cfg.radii}",
    )
    _check_distinct("radii", cfg.radii)
    _check(
        "report_methods",
        bool(cfg.report_methods) and set(cfg.report_methods) <= set(REPORT_METHODS),
        f"must be among {list(REPORT_METHODS)}, got {cfg.report_methods}",
    )
    _check("smoothing.sigmas", distinct_in_float32(sm.sigmas), f"holds two σ that are equal in float32: {sm.sigmas}")
    _check_files(cfg)


def _check_out(out: str) -> None:
    """An empty ``out`` would put the runs in the working directory and hydra's records at /.hydra; a
    relative one inside ``ray job submit --working-dir`` would put them in Ray's temporary copy of it,
    deleted after the job, so that nothing could be resumed or read."""
    _check("out", bool(str(out).strip()), "must name a directory, got an empty path")
    path = Path(out).expanduser()
    env = os.environ.get("RAYSMOOTH_OUT")
    if env is not None and not env.strip() and path.is_absolute() and path.parent == Path(path.anchor):
        raise ConfigError(  # ${oc.env:RAYSMOOTH_OUT,runs}/digits with the variable set to "" is /digits
            f"out={out} is a folder at the file system's root because RAYSMOOTH_OUT is set but empty; unset it "
            "(runs go under ./runs) or set it to the folder the runs go in"
        )
    _check("out", not path.exists() or path.is_dir(), f"must be a directory; {path} is a file")
    existing = next(p for p in [path, *path.parents] if p.exists())  # the folders out needs start under it
    if not existing.is_dir():
        raise ConfigError(f"out={out} cannot be made: {existing} is a file, not a folder")
    if existing != path and not os.access(existing, os.W_OK):
        raise ConfigError(f"out={out} cannot be made: the folder {existing} is not writable")
    if not path.is_absolute() and _in_ray_job_working_dir():
        raise ConfigError(
            f"out={out} is relative, and this Ray job runs in a temporary copy of its working_dir ({Path.cwd()}), "
            "which Ray deletes once no job uses it: the results could not be read or resumed. Give an absolute "
            "out on shared storage (out=/shared/runs/x) or set RAYSMOOTH_OUT"
        )


def _check_not_in_a_run(out: str) -> None:
    """``out`` holds one run directory per model (out/<model.name>). Pointing it at a run directory, to
    resume that run, would start a new run from nothing inside the old one, without a word."""
    from .store import RunStore

    path = Path(out).expanduser().resolve()
    for run in (path, *path.parents):
        if (run / RunStore.MANIFEST).is_file():
            give = f"{override_text('out', run.parent)} (with {override_text('model.name', run.name)})"
            resume = f"; to resume it, give {give}" if run == path else ""
            raise ConfigError(
                f"out={out} is {'a run directory' if run == path else f'inside the run directory {run}'}, and out "
                f"is the folder that holds one run directory per model (out/<model.name>){resume}"
            )


def _in_ray_job_working_dir() -> bool:
    """Whether this process is the entrypoint of a Ray job submitted with a working_dir (Ray's job
    supervisor passes the job's runtime environment in this variable)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        return bool(raw) and bool((json.loads(raw).get("runtime_env") or {}).get("working_dir"))
    except (ValueError, AttributeError):
        return False


def _check_distinct(key: str, values: Sequence[Any]) -> None:
    twice = sorted((v for v, times in Counter(values).items() if times > 1), key=str)
    _check(key, not twice, f"lists {', '.join(map(str, twice))} twice: {list(values)}")


def _check_sequential(sq: SequentialCfg, report_radii: list[float]) -> None:
    from .stats import sequential

    _check("smoothing.sequential.unit", sq.unit >= 1, f"must be at least 1, got {sq.unit}")
    _check(
        "smoothing.sequential.n_max",
        sq.n_max >= sq.unit and sq.n_max % sq.unit == 0,
        f"must be a positive multiple of smoothing.sequential.unit ({sq.unit}), got {sq.n_max}",
    )
    _check(
        "smoothing.sequential.look_ratio",
        _finite(sq.look_ratio) and sq.look_ratio > 1,
        f"must be greater than 1, got {sq.look_ratio}",
    )
    _check(
        "smoothing.sequential.alpha_spending",
        sq.alpha_spending in sequential.SPENDINGS,
        f"must be one of {sequential.SPENDINGS}, got {sq.alpha_spending!r}",
    )
    radii = sq.radii if sq.radii is not None else report_radii
    _check(
        "smoothing.sequential.radii",
        bool(radii) and all(_finite(r) and r >= 0 for r in radii),
        f"must be non-negative numbers, got {radii}",
    )
    _check(
        "smoothing.sequential.futility_beta",
        _finite(sq.futility_beta) and 0 <= sq.futility_beta < 1,
        f"must lie in [0, 1), got {sq.futility_beta}",
    )
    _check(
        "smoothing.sequential.precision",
        sq.precision is None or (_finite(sq.precision) and sq.precision > 0),
        f"must be positive or null, got {sq.precision}",
    )
    _check(
        "smoothing.sequential.r_cap",
        sq.r_cap is None or (_finite(sq.r_cap) and sq.r_cap > 0),
        f"must be positive or null, got {sq.r_cap}",
    )
    _check("smoothing.sequential.stop", sq.stop in ("rule", "never"), f"must be rule or never, got {sq.stop!r}")


def validate_sweep(cfg: SweepCfg) -> None:
    from . import stats
    from .store import RunStore, StoreError

    try:
        RunStore.open(cfg.run_dir)
    except StoreError as exc:
        raise ConfigError(f"run_dir: {exc}") from None

    p0 = parse_range(str(cfg.p0), "p0")
    for p in p0:
        _stats_check("p0", lambda p=p: stats.check_p0(float(p)))
    for a in cfg.alpha or []:
        _stats_check("alpha", lambda a=a: stats.check_alpha(a))
    _check("policy", cfg.policy in stats.POLICIES, f"must be one of {stats.POLICIES}, got {cfg.policy!r}")
    _check(
        "radii",
        bool(cfg.radii) and all(_finite(r) and r >= 0 for r in cfg.radii),
        f"must be non-negative numbers, got {cfg.radii}",
    )


def load_model_option(name: str, config_dir: Path | None = None) -> ModelCfg:
    """The typed model config ``configs/model/<name>.yaml`` (the models of ``compare``)."""
    from omegaconf import OmegaConf

    folder = (config_dir or CONFIG_DIR) / "model"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        options = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise ConfigError(f"compare: no model config {name!r} in configs/model/ (one of {options})")
    try:
        node = OmegaConf.merge(OmegaConf.structured(ModelCfg), OmegaConf.load(path))
        return OmegaConf.to_object(node)
    except Exception as exc:
        if is_hydra_error(exc):
            raise ConfigError(f"configs/model/{name}.yaml: {hydra_error_line(exc)}") from None
        raise


def _check_model_base(base: str) -> None:
    """A user's builder ``pkg.module:builder`` can at least be found on the driver (it is imported,
    and shipped to the workers, when the run starts)."""
    import importlib.util

    if ":" not in base:
        return
    module, _, attr = base.partition(":")
    if not module or not attr or not all(part.isidentifier() for part in module.split(".")) or not attr.isidentifier():
        raise ConfigError(f"model.base must be a registered base classifier or pkg.module:builder, got {base!r}")
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        found, why = None, f" ({exc})"
    else:
        why = ""
    if found is None:
        raise ConfigError(f"model.base={base}: cannot find the module {module}{why}; is it installed or on PYTHONPATH?")


def _check_safetensors(model: ModelCfg) -> None:
    """A safetensors file's header can be read without loading a tensor: a damaged or foreign file is
    refused here, before any actor starts (deeper mismatches are reported by the actor, in one line)."""
    from safetensors import safe_open

    for section_name in ("denoiser", "classifier", "onestep"):
        section = getattr(model, section_name) or {}
        for key in PATH_KEYS:
            value = section.get(key)
            if not value or "://" in str(value):
                continue
            path = Path(value)
            files = (
                [path] if path.suffix == ".safetensors" else sorted(path.glob("*.safetensors")) if path.is_dir() else []
            )
            for f in files:
                try:
                    with safe_open(str(f), framework="numpy"):
                        pass
                except Exception as exc:  # noqa: BLE001 - safetensors raises its own kinds
                    raise ConfigError(
                        f"model.{section_name}.{key}: {f}: not a valid safetensors file "
                        f"({str(exc).splitlines()[0][:120]})"
                    ) from None


def _check_files(cfg: CertifyCfg) -> None:
    """Every file the run will read exists: said now, in one line, not from inside a Ray actor."""
    _check_model_base(cfg.model.base)
    _check_safetensors(resolve_model_paths(cfg.model))
    for name in cfg.compare:
        _check_safetensors(resolve_model_paths(load_model_option(name)))
    if cfg.data.root is not None:
        root = resolve_path(cfg.data.root)
        if not Path(root).exists():
            raise ConfigError(
                f"data.root: {cfg.data.root} not found (relative paths are tried from the working "
                f"directory and from {REPO_ROOT}; see the comments in configs/data/{cfg.data.name}.yaml)"
            )


# ---- paths ---------------------------------------------------------------------------------------
def resolve_path(path: str | None) -> str | None:
    """A model or data path: absolute, relative to the working directory, or to the raysmooth checkout
    (so the committed embedded models are found from anywhere, also in a Ray job's working_dir)."""
    if path is None or "://" in str(path):
        return path
    path = os.path.expanduser(path)  # "~/imagenet" given quoted, so that no shell expanded it
    if Path(path).is_absolute():
        return path
    if Path(path).exists():
        return str(Path(path).resolve())
    candidate = REPO_ROOT / path
    return str(candidate) if candidate.exists() else path


def resolve_model_paths(model: ModelCfg) -> ModelCfg:
    """A copy of ``model`` whose file and folder paths are absolute, checked here (on the driver)
    rather than from inside a Ray actor. Every section is treated alike: the builder that takes a
    section decides what it means."""
    sections = {}
    for f in dataclasses.fields(model):
        section = getattr(model, f.name)
        if f.name in ("options",) or not isinstance(section, dict):
            continue
        section = dict(section)
        check_paths_given(f"model.{f.name}", section)
        for key in PATH_KEYS:
            value = section.get(key)
            if not value or str(value).startswith("hf://"):
                continue
            section[key] = resolve_path(str(value))
            if not Path(section[key]).exists():
                own = CONFIG_DIR / "model" / f"{model.name}.yaml"  # a committed config names what to provide
                where = f"configs/model/{model.name}.yaml" if own.is_file() else "the model's config file"
                raise ConfigError(
                    f"model.{f.name}.{key}: {value} not found (relative paths are tried from the working "
                    f"directory and from {REPO_ROOT}; see the comments in {where})"
                )
        sections[f.name] = section
    return dataclasses.replace(model, **sections)


FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK = 1024, 4096  # a large file is hashed by 1,024 spread 4 KB blocks


def model_fingerprints(model: ModelCfg) -> dict[str, str]:
    """A short hash of the files each section of a resolved model config names (``denoiser``,
    ``classifier`` …; sections naming no local file are left out). A resumed run checks them: its stored
    counts were drawn with those weights, and a denoiser fine-tuned again into the same folder would
    mix two models' counts under one run. Files up to 4 MB are hashed whole; a larger one by its size
    and 1,024 blocks spread through it (4 MB read, however large), which any retraining changes."""
    prints = {}
    for f in dataclasses.fields(model):
        section = getattr(model, f.name)
        if f.name == "options" or not isinstance(section, dict):
            continue
        files = []
        for key in PATH_KEYS:
            value = section.get(key)
            if not value or str(value).startswith("hf://"):
                continue
            root = Path(str(value))
            inside = sorted(root.rglob("*")) if root.is_dir() else [root] if root.is_file() else []
            for path in inside:
                rel = path.relative_to(root) if root.is_dir() else Path(path.name)
                if path.is_file() and not any(part.startswith((".", "_")) for part in rel.parts):
                    files.append((f"{key}/{rel}", path))
        if files:
            prints[f.name] = _files_hash(files)
    return prints


def _files_hash(files: Sequence[tuple[str, Path]]) -> str:
    h = hashlib.sha256()
    for name, path in files:
        size = path.stat().st_size
        h.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as fh:
            if size <= FINGERPRINT_BLOCKS * FINGERPRINT_BLOCK:
                h.update(fh.read())
                continue
            for k in range(FINGERPRINT_BLOCKS):
                fh.seek(k * (size - FINGERPRINT_BLOCK) // (FINGERPRINT_BLOCKS - 1))
                h.update(fh.read(FINGERPRINT_BLOCK))
    return h.hexdigest()[:16]


def counts_relevant_config(cfg: CertifyCfg) -> dict[str, Any]:
    """The part of the config that determines the counts: it defines a run directory's identity.
    Actor counts, batch sizes and the output path may change on resume."""
    model = dataclasses.asdict(cfg.model)
    model.pop("batch_size")
    smoothing = dataclasses.asdict(cfg.smoothing)
    if cfg.smoothing.mode == "sequential":  # the look schedule and the rule decide which rounds exist
        if smoothing["sequential"]["radii"] is None:
            smoothing["sequential"]["radii"] = list(cfg.radii)
    else:  # other modes never read these keys: leave them out of the identity
        smoothing.pop("sequential")
    relevant = {
        "data": dataclasses.asdict(cfg.data),
        "model": model,
        "smoothing": smoothing,
        "noise_block": cfg.engine.noise_block,
        "precision": cfg.engine.precision,
    }
    if cfg.engine.noise != "gaussian":  # the default keeps the identity of runs made before the option
        relevant["noise"] = {"kind": cfg.engine.noise, "levels": cfg.engine.levels}
    if cfg.engine.gelu != "native":  # on a GPU another function (tanh GELU), not another summation order
        relevant["gelu"] = cfg.engine.gelu
    return relevant


# How a refused resume names the identity's keys (as a user sets them), and what a key the identity
# leaves out at its default stands for: "engine.gelu: 'native' there, 'epilogue' here" says what to set.
IDENTITY_NAMES = {
    "noise_block": "engine.noise_block",
    "precision": "engine.precision",
    "noise.kind": "engine.noise",
    "noise.levels": "engine.levels",
    "gelu": "engine.gelu",
}
IDENTITY_ABSENT = {"noise.kind": "gaussian", "gelu": "native"}


# ---- small parsers shared by the command line and the jobs -------------------------------------------
def parse_floats(text: str, what: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values or not all(np.isfinite(values)):
        raise UserError(f"{what} must be finite numbers, got {text!r}")
    return values


def parse_range(text: str, what: str) -> np.ndarray:
    """Comma-separated items, each ``START:STOP:STEP`` (STOP included when the grid lands on it) or one
    value: ``0.5:0.9:0.1``, ``0.5,0.7`` and ``0.5:0.7:0.1,0.95`` all name a grid."""
    form = f"{what} must be START:STOP:STEP, a number, or several comma-separated, got {text!r}"
    grids, count = [], 0
    for item in text.split(","):
        try:
            nums = [float(p) for p in item.split(":")]
        except ValueError:
            raise UserError(form) from None
        if not all(math.isfinite(x) for x in nums):
            raise UserError(f"{what} must be finite numbers, got {text!r}")
        if len(nums) == 1:
            grids.append(np.asarray(nums))
            count += 1
            continue
        if len(nums) != 3:
            raise UserError(form)
        start, stop, step = nums
        if step <= 0 or stop < start:
            raise UserError(f"{what}: need STEP > 0 and STOP >= START, got {item!r}")
        steps = int(np.floor((stop - start) / step + 1e-9)) + 1
        count += steps
        if count > 100_000:
            raise UserError(f"{what}: {count} values is too many for one sweep (at most 100,000)")
        grids.append(np.round(start + step * np.arange(steps), 12))
    return np.concatenate(grids)
