"""Typed configs: the schema hydra checks every YAML and command-line override against.

A wrong key or a value of the wrong type fails at start with one line that names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DataCfg", "ModelCfg", "SmoothingCfg", "EngineCfg", "RayCfg", "CertifyCfg", "SweepCfg", "register_configs"]


@dataclass
class DataCfg:
    name: str = "digits"
    split: str = "test"
    root: str | None = None  # dataset folder (CIFAR-10 batches, ImageNet val, an image folder)
    skip: int = 1  # every k-th image, as the papers subsample
    max_images: int | None = None
    indices: list[int] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # loader-specific (synthetic: num_images, shape …)


@dataclass
class ModelCfg:
    """A base classifier from the registry (plain, dds, diffsmooth, onestep, linear) and its parts."""

    name: str = "model"  # the run directory's name under `out`
    base: str = "dds"
    input_shape: list[int] = field(default_factory=lambda: [1, 8, 8])
    denoiser: dict[str, Any] | None = None  # DenoiserConfig fields
    classifier: dict[str, Any] | None = None  # ClassifierConfig fields
    onestep: dict[str, Any] | None = None  # OneStepConfig fields
    options: dict[str, Any] = field(default_factory=dict)  # builder extras (diffsmooth: local_sigma …)


@dataclass
class SmoothingCfg:
    sigmas: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    chunk: int = 10_000  # split each budget into units of at most this many samples
    mode: str = "full"  # full: every σ for every image; cascade: lazily, largest σ first
    p0: list[float] = field(default_factory=lambda: [0.5])  # cascade thresholds to report
    policies: list[str] = field(default_factory=lambda: ["strict", "reference"])
    seed: int = 0


@dataclass
class EngineCfg:
    batch_size: int = 1000
    noise_block: int = 256
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
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
    give_up_after_s: float = 600.0  # stop (resumably) when no actor has finished a task for this long
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


@dataclass
class SweepCfg:
    run_dir: str = "???"
    p0: str = "0.5:0.95:0.05"
    alpha: list[float] | None = None
    policy: str = "strict"
    radii: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5])


def register_configs() -> None:
    """Register the schemas with hydra's ConfigStore (YAMLs name them in their defaults lists)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="certify_schema", node=CertifyCfg)
    cs.store(name="sweep_schema", node=SweepCfg)
    from .finetune import FinetuneConfig

    cs.store(name="finetune_schema", node=FinetuneConfig)
    cs.store(group="data", name="schema", node=DataCfg)
    cs.store(group="model", name="schema", node=ModelCfg)
    cs.store(group="smoothing", name="schema", node=SmoothingCfg)
    cs.store(group="engine", name="schema", node=EngineCfg)
    cs.store(group="ray", name="schema", node=RayCfg)
