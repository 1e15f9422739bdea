"""Diffusion fine-tuning: the losses on hand-built probabilities, where gradients go, and the job's
checkpoints, resume and output."""

import json

import pytest
import torch

from raysmooth.errors import ConfigError, ModelLoadError, UserError
from raysmooth.finetune import (
    FinetuneConfig,
    anti_consistency_loss,
    brier_loss,
    denoised_probs,
    finetune,
    finetune_loss,
    majority_vote,
)
from raysmooth.models import load_classifier, load_denoiser

from tiny_models import save_denoiser_folder, tiny_classifier_config


def P(*rows):
    return torch.tensor([rows], dtype=torch.float32)  # one image, m draws


def test_brier_is_the_mean_squared_distance_to_the_one_hot_label():
    probs = P([1.0, 0.0, 0.0], [0.5, 0.5, 0.0])
    # draw 1: 0; draw 2: 0.25 + 0.25 = 0.5 → mean 0.25
    assert brier_loss(probs, torch.tensor([0])).item() == pytest.approx(0.25)
    assert brier_loss(probs, torch.tensor([2])).item() == pytest.approx((2.0 + 1.5) / 2)


def test_majority_vote_counts_argmaxes_and_breaks_ties_low():
    probs = P([0.1, 0.9, 0.0], [0.2, 0.7, 0.1], [0.9, 0.1, 0.0])
    assert majority_vote(probs).item() == 1
    assert majority_vote(P([0.9, 0.1], [0.1, 0.9])).item() == 0


def test_anti_consistency_is_zero_when_the_majority_is_right():
    probs = P([0.1, 0.9, 0.0], [0.2, 0.7, 0.1], [0.9, 0.1, 0.0])
    assert anti_consistency_loss(probs, torch.tensor([1])).item() == 0.0


def test_anti_consistency_is_positive_when_wrong_and_falls_as_draws_disagree():
    consistent = P([0.0, 1.0, 0.0], [0.0, 1.0, 0.0])
    split = P([0.0, 1.0, 0.0], [0.1, 0.6, 0.3])
    opposite = P([0.0, 1.0, 0.0], [0.0, 0.0, 1.0])  # maximal disagreement of two draws
    y = torch.tensor([0])
    a, b, c = (anti_consistency_loss(p, y).item() for p in (consistent, split, opposite))
    assert a == pytest.approx(1.0) and 0 < b < a and c == pytest.approx(0.0)


def test_the_total_loss_weights_its_terms():
    probs, y = P([0.0, 1.0], [0.0, 1.0]), torch.tensor([0])
    out = finetune_loss(probs, y, brier_weight=2.0, ac_weight=3.0)
    assert out["brier"].item() == pytest.approx(2.0)
    assert out["anti_consistency"].item() == pytest.approx(1.0)
    assert out["loss"].item() == pytest.approx(2 * 2.0 + 3 * 1.0)


def test_gradients_reach_the_denoiser_and_never_the_classifier(tmp_path):
    den = load_denoiser({"path": str(save_denoiser_folder(tmp_path / "d"))})
    den.unet.requires_grad_(True).train()
    clf = load_classifier(tiny_classifier_config())
    clf.requires_grad_(False)
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2])
    probs = denoised_probs(den, clf, x, torch.tensor([0.25, 0.5, 1.0]), 2, torch.Generator().manual_seed(0))
    finetune_loss(probs, y)["loss"].backward()
    grads = [p.grad for p in den.unet.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    assert all(p.grad is None for p in clf.parameters())


def _cfg(tmp_path, **kw):
    folder = save_denoiser_folder(tmp_path / "src")
    base = dict(
        denoiser={"path": str(folder)},
        classifier=dict(tiny_classifier_config().__dict__),
        steps=4,
        batch_size=4,
        draws=2,
        checkpoint_every=2,
        out=str(tmp_path / "ft"),
        threads=1,
    )
    base.update(kw)
    return FinetuneConfig(**base)


def test_finetuning_checkpoints_resumes_and_writes_a_loadable_denoiser(tmp_path):
    steps = []
    cfg = _cfg(tmp_path)
    cfg.steps = 2
    finetune(cfg, progress=lambda s, row: steps.append(s))
    cfg.steps = 4  # a longer run into the same folder continues from the checkpoint
    out = finetune(cfg, progress=lambda s, row: steps.append(s))
    assert steps == [1, 2, 3, 4]
    lines = [json.loads(ln) for ln in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and all("anti_consistency" in r for r in lines)
    den = load_denoiser({"path": str(out)})
    before = load_denoiser({"path": str(tmp_path / "src")})
    changed = any(
        not torch.equal(a, b) for a, b in zip(den.unet.state_dict().values(), before.unet.state_dict().values())
    )
    assert changed
    assert json.loads((out / "finetune_config.json").read_text())["draws"] == 2


def test_a_crash_between_the_checkpoint_renames_resumes_from_the_checkpoint_moved_aside(tmp_path):
    """The old checkpoint is moved aside before the new one is renamed in: a crash between the two
    leaves only the aside copy, and the next run must resume from it, not from step 0."""
    steps = []
    cfg = _cfg(tmp_path, steps=2)
    finetune(cfg, progress=lambda s, row: None)
    ft = tmp_path / "ft"
    (ft / "checkpoint").rename(ft / "_checkpoint.old")
    cfg.steps = 3
    finetune(cfg, progress=lambda s, row: steps.append(s))
    assert steps == [3]
    assert torch.load(ft / "checkpoint" / "state.pt", weights_only=True)["step"] == 3
    assert not (ft / "_checkpoint.old").exists() and not (ft / "_checkpoint.tmp").exists()


def test_a_resume_drops_the_metrics_of_steps_it_trains_again(tmp_path):
    """Steps logged after the last checkpoint (a crash before the next) and a line cut short are
    trained and logged again: the log keeps one line per step."""
    cfg = _cfg(tmp_path, steps=2)
    finetune(cfg, progress=lambda s, row: None)
    metrics = tmp_path / "ft" / "metrics.jsonl"
    with metrics.open("a") as fh:
        fh.write(json.dumps({"step": 3, "loss": 9.0}) + "\n" + '{"step": 4, "lo')
    cfg.steps = 4
    finetune(cfg, progress=lambda s, row: None)
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[2]["loss"] != 9.0


def test_fewer_steps_than_the_checkpoint_has_are_refused(tmp_path):
    """The denoiser would be saved as trained for 1 step while its weights had 2."""
    finetune(_cfg(tmp_path, steps=2), progress=lambda s, row: None)
    with pytest.raises(ConfigError, match=r"already at step 2, past finetune.steps=1; give finetune.steps=2"):
        finetune(_cfg(tmp_path, steps=1), progress=lambda s, row: None)
    assert json.loads((tmp_path / "ft" / "finetune_config.json").read_text())["steps"] == 2


def test_another_config_in_the_same_folder_is_refused_naming_what_changed(tmp_path):
    finetune(_cfg(tmp_path, steps=1), progress=lambda s, row: None)
    with pytest.raises(ConfigError, match=r"another config \(lr: 0.0001 there, 0.001 here\)"):
        finetune(_cfg(tmp_path, steps=1, lr=1e-3), progress=lambda s, row: None)


def test_an_out_holding_other_things_is_refused_not_its_denoiser_replaced(tmp_path):
    """Found by hand: `raysmooth finetune out=raysmooth/embedded/digits` replaced the embedded denoiser (its
    own source) with the fine-tuned one; any folder with a denoiser/ in it lost it."""
    cfg = _cfg(tmp_path, steps=1)
    out = tmp_path / "ft"
    (out / "denoiser").mkdir(parents=True)
    (out / "denoiser" / "mine.txt").write_text("not yours")
    with pytest.raises(UserError, match=r"ft is not empty \(denoiser\) and holds no fine-tuning run; use a new"):
        finetune(cfg, progress=lambda s, row: None)
    assert (out / "denoiser" / "mine.txt").read_text() == "not yours"


def test_a_start_that_failed_on_a_wrong_path_does_not_bind_the_folder_to_it(tmp_path):
    """Found by hand: a mistyped denoiser.path wrote its config into out before failing, and the
    corrected command was then refused as another config ('/nope' there)."""
    with pytest.raises(ModelLoadError, match="no such denoiser folder"):
        finetune(_cfg(tmp_path, steps=1, denoiser={"path": str(tmp_path / "nope")}), progress=lambda s, row: None)
    finetune(_cfg(tmp_path, steps=1), progress=lambda s, row: None)
    assert (tmp_path / "ft" / "denoiser").is_dir()


@pytest.mark.parametrize("damaged", ["state.pt", "trainable.safetensors"])
def test_a_damaged_checkpoint_is_one_line_naming_it(tmp_path, damaged):
    finetune(_cfg(tmp_path, steps=1), progress=lambda s, row: None)
    (tmp_path / "ft" / "checkpoint" / damaged).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"checkpoint: not a readable fine-tuning checkpoint .*remove it"):
        finetune(_cfg(tmp_path, steps=2), progress=lambda s, row: None)


def test_lora_finetuning_merges_into_a_plain_unet(tmp_path):
    pytest.importorskip("peft")
    out = finetune(_cfg(tmp_path, lora_rank=2, steps=2), progress=lambda s, r: None)
    den = load_denoiser({"path": str(out)})
    assert not any("lora" in k for k in den.unet.state_dict())


def test_bad_finetuning_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="draws"):
        finetune(_cfg(tmp_path, draws=1), progress=lambda s, r: None)
    with pytest.raises(ConfigError, match="lora_targets"):
        finetune(_cfg(tmp_path, lora_rank=2, lora_targets=["nothing"]), progress=lambda s, r: None)


@pytest.mark.parametrize(
    "bad,says",
    [
        ({"lr": float("inf")}, r"finetune.lr must lie in \(0, 1\]"),
        ({"lr": 1e39}, r"finetune.lr must lie in \(0, 1\]"),
        ({"weight_decay": -1.0}, "finetune.weight_decay"),
        ({"brier_weight": float("nan")}, "non-negative finite numbers"),
        ({"brier_weight": 0.0, "anti_consistency_weight": 0.0}, "nothing would be learned"),
        ({"checkpoint_every": 0}, "finetune.checkpoint_every must be at least 1"),
        ({"threads": 0}, "finetune.threads must be at least 1"),
        ({"sigmas": [0.25, 0.5, 0.25]}, r"finetune.sigmas lists a σ twice"),  # was trained on twice as often
        ({"sigmas": []}, r"finetune.sigmas must be one or more positive finite numbers, got \[\]"),
        ({"sigmas": [0.25, float("nan")]}, "finetune.sigmas must be one or more positive finite numbers"),
    ],
)
def test_settings_that_would_train_nothing_or_nans_are_refused_before_training(tmp_path, bad, says):
    with pytest.raises(ConfigError, match=says):
        finetune(_cfg(tmp_path, **bad), progress=lambda s, r: None)
    assert not (tmp_path / "ft").exists()


def test_lora_targets_without_a_lora_rank_are_refused_not_ignored(tmp_path):
    """Without a rank every weight is trained: targets given for adapters would silently mean nothing."""
    with pytest.raises(ConfigError, match=r"lora_targets=\['to_q'\] would be ignored: with lora_rank null"):
        finetune(_cfg(tmp_path, lora_targets=["to_q"]), progress=lambda s, r: None)
    assert not (tmp_path / "ft").exists()


def test_a_loss_that_turns_nan_stops_the_run_before_it_is_trained_on(tmp_path, monkeypatch):
    import raysmooth.finetune as ft

    real, calls = ft.finetune_loss, []

    def nan_on_the_third_step(*args):
        losses = real(*args)
        calls.append(1)
        return {**losses, "loss": losses["loss"] * float("nan")} if len(calls) == 3 else losses

    monkeypatch.setattr(ft, "finetune_loss", nan_on_the_third_step)
    with pytest.raises(UserError, match=r"diverged at step 3: .*try a smaller one.*checkpoint in .* is kept"):
        finetune(_cfg(tmp_path, steps=4, checkpoint_every=2), progress=lambda s, r: None)
    assert not (tmp_path / "ft" / "denoiser").exists()
    assert torch.load(tmp_path / "ft" / "checkpoint" / "state.pt", weights_only=True)["step"] == 2


def test_weights_a_step_made_non_finite_are_never_checkpointed(tmp_path, monkeypatch):
    def step_that_blows_up(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.data.fill_(float("inf"))

    monkeypatch.setattr(torch.optim.AdamW, "step", step_that_blows_up)
    with pytest.raises(UserError, match="diverged at step 1"):
        finetune(_cfg(tmp_path, steps=1, checkpoint_every=1), progress=lambda s, r: None)
    assert not (tmp_path / "ft" / "denoiser").exists() and not (tmp_path / "ft" / "checkpoint").exists()


def test_choosing_a_data_set_for_finetuning_says_only_digits_is_trained_on(capsys):
    from raysmooth.apps import finetune_main

    assert finetune_main(["data=cifar10"]) == 2
    assert "trains on the digits training split" in capsys.readouterr().err


def test_finetuning_at_a_sigma_in_what_looks_like_0_255_units_runs_and_says_so(tmp_path, capsys):
    """As the certify job says it: the denoiser would be trained for noise 64x the pixel range."""
    from raysmooth.apps import finetune_main

    args = ["steps=1", "batch_size=4", "draws=2", "threads=1", "sigmas=[0.25,64]", f"out={tmp_path}"]
    assert finetune_main(args) == 0
    assert capsys.readouterr().err.count("σ = 64 in [0, 1] pixel units") == 1


@pytest.mark.parametrize("fails", ["weights", "state"])
def test_a_full_disk_at_a_checkpoint_names_the_folder_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, fails):
    """safetensors reports ENOSPC in its own error type and torch.save to a path as an "enforce fail";
    both must be an OSError naming the checkpoint folder, with the half-written copy gone."""
    import errno
    import os

    import safetensors.torch
    from safetensors import SafetensorError

    finetune(_cfg(tmp_path, steps=1), progress=lambda s, row: None)
    longer = _cfg(tmp_path, steps=2)

    def full(state, where, *args, **kwargs):  # what each library raises on a full disk
        if fails == "weights":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        if isinstance(where, (str, os.PathLike)):  # torch.save given a path
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        raise OSError(errno.ENOSPC, "No space left on device")  # given a file object: Python's own write error

    target = (safetensors.torch, "save_file") if fails == "weights" else (torch, "save")
    monkeypatch.setattr(*target, full)
    ckpt = tmp_path / "ft" / "checkpoint"
    with pytest.raises(OSError) as raised:
        finetune(longer, progress=lambda s, row: None)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(ckpt)
    assert not (tmp_path / "ft" / "_checkpoint.tmp").exists()
    assert torch.load(ckpt / "state.pt", weights_only=True)["step"] == 1  # the last whole checkpoint


def test_a_full_disk_is_one_line_saying_to_free_space_and_resume(capsys):
    import errno

    from raysmooth.apps import _failed

    assert _failed("finetune", OSError(errno.ENOSPC, "No space left on device", "/runs/ft/checkpoint")) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "raysmooth finetune: error: /runs/ft/checkpoint: No space left on device (the disk is full: what was "
        "stored before is kept; free some space and run the same command again to resume from the last checkpoint)"
    )


def test_a_grid_gives_each_job_its_own_folder_and_a_line_that_certifies_it(tmp_path, capsys):
    """Every job of `-m lr=a,b` fine-tuned into one folder, so the second was refused once the first had
    trained; and the printed override must read back as the job's folder, whose name holds '='."""
    import shlex

    from raysmooth.apps import finetune_main
    from raysmooth.config import compose

    args = ["-m", "steps=1", "batch_size=4", "draws=2", "threads=1", f"out={tmp_path}", "lr=0.001,0.0001"]
    assert finetune_main(args) == 0
    assert sorted(p.parent.name for p in tmp_path.glob("lr=*/denoiser")) == ["lr=0.0001", "lr=0.001"]
    uses = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("use it with: raysmooth certify ")]
    assert len(uses) == 2
    words = shlex.split(uses[1].removeprefix("use it with: raysmooth certify "))
    assert compose("certify", words).model.denoiser["path"] == str(tmp_path / "lr=0.0001" / "denoiser")


def test_a_second_finetuning_run_into_a_folder_in_use_is_refused_naming_the_holder(tmp_path):
    """Two runs into one out (two terminals, the default out) wrote one checkpoint folder in turns: weights
    of one run beside the optimizer state of the other."""
    import os

    from raysmooth.store import FolderLock, StoreError

    cfg = _cfg(tmp_path, steps=1)
    (tmp_path / "ft").mkdir()
    with FolderLock(tmp_path / "ft", "fine-tuning run"):  # what the first run holds while it trains
        with pytest.raises(StoreError, match=rf"in use by another fine-tuning run \(pid {os.getpid()} on"):
            finetune(cfg, progress=lambda s, row: None)
    assert not (tmp_path / "ft" / "finetune_config.json").exists()
    finetune(cfg, progress=lambda s, row: None)  # free again once the holder is gone
