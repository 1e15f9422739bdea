"""Training of the embedded digits models (``raysmooth train-toy``).

Everything the default run needs, trained by our own code on the training split of scikit-learn's
digits with fixed seeds, and saved as safetensors with a JSON card (config, seed, test metrics):

* ``denoiser/``: a small DDPM (diffusers ``UNet2DModel`` + ``DDPMScheduler``), ε-prediction;
* ``classifier/``: a timm ResNet on clean images;
* ``classifier_noisy/``: the same net trained with Gaussian noise augmentation (DiffSmooth's base);
* ``onestep/``: a noise-conditioned classifier (σ is an input), trained on noisy inputs across the
  σ range with a consistency term between two noise draws (rRCM-style).

Each classifier is a folder (``config.json`` + ``model.safetensors`` + ``card.json``), as
``save_classifier`` / ``save_onestep`` write them.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .data import digits_split
from .models import ClassifierConfig, OneStepConfig, save_classifier, save_onestep
from .models.checkpoints import replacing_folder
from .models.classifier import create_timm_model
from .models.onestep import build_onestep
from .models.schedule import DDPM_LINEAR, schedule_from_config
from .store import replace_text

__all__ = ["ToyConfig", "train_all", "EMBEDDED_DIR", "UNET_CONFIG", "CLASSIFIER"]

log = logging.getLogger("raysmooth")
EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded" / "digits"

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=[16, 32],
    down_block_types=["DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D"],
    norm_num_groups=8,
)
SCHEDULER_CONFIG: dict[str, Any] = dict(DDPM_LINEAR)
CLASSIFIER: dict[str, Any] = dict(
    name="resnet18",
    num_classes=10,
    in_chans=1,
    input_size=[8, 8],
    mean=[0.5],
    std=[0.5],
    model_kwargs={"channels": [16, 32, 64, 128]},
)


@dataclass
class ToyConfig:
    seed: int = 0
    threads: int = 2
    denoiser_steps: int = 6000
    denoiser_batch: int = 256
    denoiser_lr: float = 2e-3
    classifier_epochs: int = 60
    classifier_batch: int = 128
    classifier_lr: float = 3e-3
    noise_aug_sigma: float = 0.25  # DiffSmooth's base classifier: trained at σ_train
    onestep_epochs: int = 120
    onestep_sigma_range: list[float] = field(default_factory=lambda: [0.1, 1.2])
    onestep_consistency: float = 1.0  # weight of KL(mean ‖ each) between two noise draws
    eval_sigmas: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])


def _cosine(step: int, total: int, lr: float) -> float:
    warm = max(1, total // 50)
    if step < warm:
        return lr * (step + 1) / warm
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift by up to one pixel (digits are small; this is enough to regularise)."""
    pad = F.pad(x, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
    return pad[:, :, dy : dy + 8, dx : dx + 8]


# ---- denoiser ------------------------------------------------------------------------------------
def train_denoiser(cfg: ToyConfig, train: torch.Tensor, out: Path, report: Callable[[str], None]) -> dict[str, Any]:
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    unet = UNet2DModel(**UNET_CONFIG)
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    acp = torch.tensor(schedule_from_config(SCHEDULER_CONFIG), dtype=torch.float32)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.denoiser_lr, weight_decay=1e-4)
    start = time.monotonic()
    for step in range(cfg.denoiser_steps):
        for g in opt.param_groups:
            g["lr"] = _cosine(step, cfg.denoiser_steps, cfg.denoiser_lr)
        idx = torch.randint(0, len(train), (cfg.denoiser_batch,), generator=gen)
        x0 = 2 * _augment(train[idx], gen) - 1  # shift in [0,1] (background 0), then to [-1,1]
        t = torch.randint(0, len(acp), (cfg.denoiser_batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(unet(x_t, t).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == cfg.denoiser_steps - 1:
            report(
                f"denoiser step {step}/{cfg.denoiser_steps}: loss {loss.item():.4f} ({time.monotonic() - start:.0f} s)"
            )
    unet.eval()
    with replacing_folder(out / "denoiser") as tmp:  # the committed denoiser is never half overwritten
        unet.save_pretrained(tmp / "unet")
        sched.save_pretrained(tmp / "scheduler")
    return {"steps": cfg.denoiser_steps, "final_loss": float(loss.item()), "seconds": time.monotonic() - start}


# ---- classifiers ---------------------------------------------------------------------------------
def _train_classifier(
    model: torch.nn.Module,
    forward: Callable,
    cfg: ToyConfig,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    epochs: int,
    gen: torch.Generator,
    report: Callable[[str], None],
    name: str,
    loss_fn: Callable | None = None,
) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.classifier_lr, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(train_x) / cfg.classifier_batch)
    total = epochs * steps_per_epoch
    step, start = 0, time.monotonic()
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(train_x), generator=gen)
        for b in range(steps_per_epoch):
            idx = perm[b * cfg.classifier_batch : (b + 1) * cfg.classifier_batch]
            for g in opt.param_groups:
                g["lr"] = _cosine(step, total, cfg.classifier_lr)
            x = _augment(train_x[idx], gen)
            loss = loss_fn(x, train_y[idx]) if loss_fn else F.cross_entropy(forward(x), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if epoch % 10 == 0 or epoch == epochs - 1:
            report(f"{name} epoch {epoch}/{epochs}: loss {loss.item():.4f} ({time.monotonic() - start:.0f} s)")
    model.eval()
    return time.monotonic() - start


@torch.inference_mode()
def _accuracy(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(x).argmax(1) == y).float().mean())


def _noisy(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    return x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


def train_all(
    cfg: ToyConfig | None = None, out: Path | str = EMBEDDED_DIR, report: Callable[[str], None] = log.info
) -> dict:
    """Train the four embedded models into ``out``; returns their cards."""
    cfg = cfg or ToyConfig()
    out = Path(out)
    torch.set_num_threads(cfg.threads)
    parts = digits_split()
    train_x, train_y, _ = (torch.from_numpy(a) for a in parts["train"])
    test_x, test_y, _ = (torch.from_numpy(a) for a in parts["test"])
    common = {
        "dataset": "sklearn digits, fixed split seed 0 (train 1437 / test 360)",
        "config": asdict(cfg),
        "torch": torch.__version__,
    }
    cards: dict[str, Any] = {}

    # 1. The denoiser, and how well denoise-then-(clean classifier) does comes after 2.
    den_stats = train_denoiser(cfg, train_x, out, report)

    # 2. Clean classifier.
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    torch.manual_seed(cfg.seed + 1)
    ccfg = ClassifierConfig(**CLASSIFIER)
    clean = create_timm_model(ccfg)
    norm = lambda x: (x - 0.5) / 0.5  # noqa: E731
    secs = _train_classifier(
        clean, lambda x: clean(norm(x)), cfg, train_x, train_y, cfg.classifier_epochs, gen, report, "classifier"
    )
    clean_acc = _accuracy(lambda x: clean(norm(x)), test_x, test_y)
    cards["classifier"] = {**common, "model": CLASSIFIER, "test_accuracy_clean": clean_acc, "seconds": secs}
    save_classifier(clean, ccfg, out / "classifier", cards["classifier"])

    # Denoiser metrics: one-shot x̂₀ error and clean-classifier accuracy on x̂₀, per σ.
    from .models import load_denoiser

    den = load_denoiser({"path": str(out / "denoiser")})
    den_metrics = {}
    for i, s in enumerate(cfg.eval_sigmas):
        z = _noisy(test_x, s, 100 + i)
        with torch.inference_mode():
            x0 = den(z, torch.full((len(z),), s))
        den_metrics[f"sigma_{s}"] = {
            "mse_denoised": float(F.mse_loss(x0, test_x)),
            "mse_noisy": float(F.mse_loss(z.clamp(0, 1), test_x)),
            "clean_classifier_accuracy_on_denoised": _accuracy(lambda x: clean(norm(x)), x0, test_y),
        }
    cards["denoiser"] = {**common, "unet": UNET_CONFIG, "scheduler": SCHEDULER_CONFIG, **den_stats, "test": den_metrics}
    replace_text(out / "denoiser" / "card.json", json.dumps(cards["denoiser"], indent=2, sort_keys=True) + "\n")

    # 3. Noise-augmented classifier (DiffSmooth's base).
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    torch.manual_seed(cfg.seed + 2)
    noisy = create_timm_model(ccfg)

    def noisy_forward(x):
        return noisy(norm(x + cfg.noise_aug_sigma * torch.randn(x.shape, generator=gen)))

    secs = _train_classifier(
        noisy, noisy_forward, cfg, train_x, train_y, cfg.classifier_epochs, gen, report, "classifier_noisy"
    )
    cards["classifier_noisy"] = {
        **common,
        "model": CLASSIFIER,
        "noise_aug_sigma": cfg.noise_aug_sigma,
        "seconds": secs,
        "test_accuracy_clean": _accuracy(lambda x: noisy(norm(x)), test_x, test_y),
        "test_accuracy_at_noise_aug_sigma": _accuracy(
            lambda x: noisy(norm(x)), _noisy(test_x, cfg.noise_aug_sigma, 7), test_y
        ),
    }
    save_classifier(noisy, ccfg, out / "classifier_noisy", cards["classifier_noisy"])

    # 4. One-step noise-conditioned classifier with a two-draw consistency term.
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    torch.manual_seed(cfg.seed + 3)
    ocfg = OneStepConfig(name=CLASSIFIER["name"], num_classes=10, in_chans=1, model_kwargs=CLASSIFIER["model_kwargs"])
    onestep = build_onestep(ocfg)
    lo, hi = cfg.onestep_sigma_range

    def onestep_loss(x, y):
        sig = torch.exp(torch.empty(len(x)).uniform_(math.log(lo), math.log(hi), generator=gen))
        logits = [onestep(x + sig.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=gen), sig) for _ in range(2)]
        logp = [F.log_softmax(z, 1) for z in logits]
        mean_p = 0.5 * (logp[0].exp() + logp[1].exp())
        kl = sum((mean_p * (mean_p.clamp_min(1e-12).log() - lp)).sum(1).mean() for lp in logp) / 2
        return sum(F.nll_loss(lp, y) for lp in logp) / 2 + cfg.onestep_consistency * kl

    secs = _train_classifier(
        onestep, None, cfg, train_x, train_y, cfg.onestep_epochs, gen, report, "onestep", loss_fn=onestep_loss
    )
    accs = {}
    for i, s in enumerate(cfg.eval_sigmas):
        accs[f"sigma_{s}"] = _accuracy(
            lambda z, s=s: onestep(z, torch.full((len(z),), s)), _noisy(test_x, s, 200 + i), test_y
        )
    cards["onestep"] = {
        **common,
        "model": asdict(ocfg),
        "sigma_range": cfg.onestep_sigma_range,
        "seconds": secs,
        "test_accuracy_noisy_single_draw": accs,
    }
    save_onestep(onestep, ocfg, out / "onestep", cards["onestep"])
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    report(f"embedded models written to {out} ({total / 1e6:.1f} MB)")
    return cards
