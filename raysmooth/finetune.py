"""Diffusion fine-tuning for the cascade: Brier + anti-consistency losses (Jeong & Shin, NeurIPS'23).

The paper fine-tunes the denoiser so that denoise-then-classify is *consistent* where the image is
recoverable and *diverse* where it is not, so that a high-σ level stays below p0 instead of being
confidently wrong. Its code does not ship this part (docs/methods.md §5), so the loss here is a
reconstruction with every weight configurable:

    L = w_B · (1/m) Σ_i ‖P_i − e_y‖²  +  λ · 1[majority(ŷ_1..ŷ_m) ≠ y] · (1 − d)

where P_i = softmax(F(D(√ᾱ_{t*}(2x−1 + 2σε_i)))) for m independent draws, F is frozen, and
d ∈ [0, 1] is the draws' disagreement (1/m) Σ_i ‖P_i − P̄‖² normalised by its maximum (m−1)/m.
The anti-consistency term is zero when the majority is right, positive when it is wrong, and
bounded; it falls as the draws disagree more.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pickle
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import PATH_KEYS, FinetuneConfig, resolve_path
from .errors import ConfigError, UserError
from .models import DiffusionDenoiser, NormalizedClassifier, load_classifier, load_denoiser
from .models.checkpoints import recover_folder, replacing_folder
from .store import FolderLock, config_differences, replace_text

__all__ = ["FinetuneConfig", "brier_loss", "anti_consistency_loss", "majority_vote", "finetune_loss", "finetune"]

log = logging.getLogger("raysmooth")


# ---- losses (pure functions of probabilities) ---------------------------------------------------
def brier_loss(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over images and draws of ‖P − e_y‖². ``probs``: (B, m, C); ``labels``: (B,)."""
    onehot = F.one_hot(labels, probs.shape[-1]).to(probs.dtype)[:, None, :]
    return ((probs - onehot) ** 2).sum(-1).mean()


def majority_vote(probs: torch.Tensor) -> torch.Tensor:
    """The most frequent argmax over the m draws (ties to the lower class). (B, m, C) → (B,)."""
    votes = F.one_hot(probs.argmax(-1), probs.shape[-1]).sum(1)
    return votes.argmax(-1)


def anti_consistency_loss(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-image 1[majority ≠ y]·(1 − d), d the normalised disagreement of the draws. (B,)"""
    m = probs.shape[1]
    mean = probs.mean(1, keepdim=True)
    spread = ((probs - mean) ** 2).sum(-1).mean(1)  # (1/m) Σ ‖P_i − P̄‖²
    d = spread / ((m - 1) / m)
    wrong = (majority_vote(probs.detach()) != labels).to(probs.dtype)
    return wrong * (1.0 - d)


def finetune_loss(
    probs: torch.Tensor, labels: torch.Tensor, brier_weight: float = 1.0, ac_weight: float = 1.0
) -> dict[str, torch.Tensor]:
    brier = brier_loss(probs, labels)
    ac = anti_consistency_loss(probs, labels).mean()
    return {"loss": brier_weight * brier + ac_weight * ac, "brier": brier, "anti_consistency": ac}


def denoised_probs(
    denoiser: DiffusionDenoiser,
    classifier: NormalizedClassifier,
    x: torch.Tensor,
    sigma: torch.Tensor,
    draws: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """Softmax of the frozen classifier on m one-shot denoisings per image: (B, m, C).
    Gradients flow into the denoiser only."""
    b = x.shape[0]
    xr = x.repeat_interleave(draws, 0)
    sr = sigma.repeat_interleave(draws, 0)
    z = xr + sr.view(-1, 1, 1, 1) * torch.randn(xr.shape, generator=gen, device=x.device)
    logits = classifier(denoiser(z, sr))
    return logits.float().softmax(-1).view(b, draws, -1)


# ---- the training loop ------------------------------------------------------------------------------
def _training_images(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name != "digits":
        raise ConfigError(f"finetune.data: only digits ships with a package; got {name!r}")
    from .data import digits_split

    x, y, _ = digits_split()["train"]
    return torch.from_numpy(x), torch.from_numpy(y)


def _trainable(cfg: FinetuneConfig, denoiser: DiffusionDenoiser):
    unet = denoiser.unet
    if cfg.lora_rank is None:
        unet.requires_grad_(True)
        return unet, [p for p in unet.parameters() if p.requires_grad]
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:  # pragma: no cover - peft is a declared dependency
        raise ConfigError("finetune.lora_rank needs the peft package (pip install peft)") from None
    names = {n.split(".")[-1] for n, _ in unet.named_modules()}
    targets = [t for t in cfg.lora_targets if t in names]
    if not targets:
        raise ConfigError(f"finetune.lora_targets match no module of the UNet: {cfg.lora_targets}")
    wrapped = get_peft_model(unet, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, target_modules=targets))
    denoiser.unet = wrapped
    return wrapped, [p for p in wrapped.parameters() if p.requires_grad]


def _save_denoiser(denoiser: DiffusionDenoiser, cfg: FinetuneConfig, src: Path, dst: Path) -> Path:
    unet = denoiser.unet
    if cfg.lora_rank is not None:
        unet = unet.merge_and_unload()  # a plain UNet2DModel again: loads like any other denoiser
    with replacing_folder(dst) as tmp:  # never a moment without a whole denoiser at dst or beside it
        unet.save_pretrained(tmp / "unet")
        if (src / "scheduler").is_dir():
            shutil.copytree(src / "scheduler", tmp / "scheduler")
        (tmp / "finetune_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return dst


def _diverged(step: int, cfg: FinetuneConfig, ckpt: Path) -> None:
    """Stop before a non-finite loss or weight is trained on or saved: the last checkpoint stays the
    last good state, and no denoiser of NaNs is written."""
    kept = f"the checkpoint in {ckpt} is kept" if (ckpt / "state.pt").exists() else "nothing was saved"
    raise UserError(
        f"fine-tuning diverged at step {step}: the loss or the weights are no longer finite "
        f"(finetune.lr={cfg.lr:g}: try a smaller one, into a new finetune.out); {kept}"
    )


def _load_checkpoint(ckpt: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The last checkpoint's state (step, optimizer, generator) and trainable weights; None if none."""
    if not (ckpt / "state.pt").exists():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = torch.load(ckpt / "state.pt", weights_only=True)
        state["step"] = int(state["step"])
        return state, load_file(str(ckpt / "trainable.safetensors"))
    except (
        RuntimeError,
        OSError,
        EOFError,
        KeyError,
        TypeError,
        ValueError,
        pickle.UnpicklingError,
        SafetensorError,
    ) as exc:
        raise UserError(
            f"{ckpt}: not a readable fine-tuning checkpoint ({type(exc).__name__}); remove it to start over "
            "from step 0, or use a new finetune.out"
        ) from None


def _keep_metrics_until(path: Path, step: int) -> None:
    """Drop the metrics lines of steps after the checkpoint a run resumes from (a crash between two
    checkpoints logged steps that are trained again), and a line a crash cut short; the log keeps one
    line per step. Written beside and renamed in, never edited in place."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            keep.append(line)
    if keep != lines:
        replace_text(path, "".join(f"{line}\n" for line in keep))


def finetune(cfg: FinetuneConfig, progress: Callable[[int, dict], None] | None = None) -> Path:
    """Fine-tune; resumes from ``out/checkpoint`` when present. Returns the folder of the new
    denoiser (a diffusers folder: ``denoiser.path=<it>`` loads it in ``raysmooth certify``)."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, "fine-tuning run"):  # two runs into one folder would mix their checkpoints
        return _finetune_into(out, cfg, progress)


def _finetune_into(out: Path, cfg: FinetuneConfig, progress: Callable[[int, dict], None] | None) -> Path:
    config_file = out / "finetune_config.json"
    current = json.loads(json.dumps(asdict(cfg)))  # as it reads back
    settings = {k: v for k, v in current.items() if k != "steps"}  # a longer run into the same folder continues it
    if not config_file.exists() and (held := sorted(p.name for p in out.iterdir() if not p.name.startswith("."))):
        # the run writes out/denoiser and out/checkpoint: into the embedded models' folder (or any other) it
        # would replace what is there, the source denoiser included
        raise UserError(
            f"{out} is not empty ({', '.join(held[:3])}{', …' if len(held) > 3 else ''}) and holds no fine-tuning "
            "run; use a new finetune.out (the fine-tuned denoiser is written to out/denoiser)"
        )
    if config_file.exists():
        try:
            previous = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            previous = None
        if not isinstance(previous, dict):
            raise UserError(f"{config_file}: damaged (not the JSON of a fine-tuning config); use a new finetune.out")
        previous.pop("steps", None)
        if previous != settings:
            changed = config_differences(previous, settings)
            raise ConfigError(
                f"{out} holds a fine-tuning run of another config ({changed}); use a new finetune.out, "
                "or the same settings to resume"
            )
    ckpt = recover_folder(out / "checkpoint")
    checkpoint = _load_checkpoint(ckpt)
    done = checkpoint[0]["step"] if checkpoint else 0
    if done > cfg.steps:
        raise ConfigError(
            f"{out} holds a fine-tuning run already at step {done}, past finetune.steps={cfg.steps}; give "
            f"finetune.steps={done} or more to go on, or a new finetune.out"
        )

    den_cfg = {k: resolve_path(v) if k in PATH_KEYS and v else v for k, v in cfg.denoiser.items()}
    denoiser = load_denoiser(den_cfg)
    clf_cfg = {k: resolve_path(v) if k in PATH_KEYS and v else v for k, v in cfg.classifier.items()}
    classifier = load_classifier(clf_cfg)
    classifier.requires_grad_(False).eval()
    unet, params = _trainable(cfg, denoiser)
    unet.train()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    x_train, y_train = _training_images(cfg.data)
    # Written once the models load: a start that failed on a wrong path binds the folder to nothing.
    replace_text(config_file, json.dumps(asdict(cfg), indent=2) + "\n")
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0

    if checkpoint is not None:
        state, weights = checkpoint
        trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(weights[n])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step = int(state["step"])
        log.info("resuming fine-tuning at step %d", step)

    def save_checkpoint() -> None:
        from safetensors.torch import save_file

        with replacing_folder(ckpt) as tmp:  # a crash at any moment leaves one whole checkpoint
            save_file(
                {n: p.detach().contiguous() for n, p in unet.named_parameters() if p.requires_grad},
                str(tmp / "trainable.safetensors"),
            )
            with open(tmp / "state.pt", "wb") as fh:  # a file object: a full disk is an OSError, not torch's riddle
                torch.save({"optimizer": opt.state_dict(), "generator": gen.get_state(), "step": step}, fh)

    sigmas = torch.tensor(cfg.sigmas, dtype=torch.float32)
    metrics_path = out / "metrics.jsonl"
    _keep_metrics_until(metrics_path, step)
    bar = None
    if progress is None:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True)
    started = time.monotonic()
    # the bar ends its line (closes) before any error is printed
    with metrics_path.open("a") as metrics, bar if bar is not None else contextlib.nullcontext():
        while step < cfg.steps:
            idx = torch.randint(0, len(x_train), (cfg.batch_size,), generator=gen)
            sig = sigmas[torch.randint(0, len(sigmas), (cfg.batch_size,), generator=gen)]
            probs = denoised_probs(denoiser, classifier, x_train[idx], sig, cfg.draws, gen)
            losses = finetune_loss(probs, y_train[idx], cfg.brier_weight, cfg.anti_consistency_weight)
            values = {k: float(v.detach()) for k, v in losses.items()}  # the metrics line needs them anyway
            if not math.isfinite(values["loss"]):
                _diverged(step + 1, cfg, ckpt)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            step += 1
            row = {"step": step, **values, "seconds": time.monotonic() - started}
            metrics.write(json.dumps(row) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{row['loss']:.4f}", brier=f"{row['brier']:.4f}", ac=f"{row['anti_consistency']:.3f}"
                )
            if progress is not None:
                progress(step, row)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                metrics.flush()
                if not all(bool(torch.isfinite(p).all()) for p in params):  # one step can blow the weights up
                    _diverged(step, cfg, ckpt)
                save_checkpoint()
    unet.eval()
    src = Path(den_cfg["path"]) if den_cfg.get("path") else out
    return _save_denoiser(denoiser, cfg, src, out / "denoiser")
