"""Loading weights without ever executing a pickle: safetensors, or ``torch.load(weights_only=True)``;
and the self-describing model folders (``config.json`` + ``model.safetensors``) our builders read."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError, naming, one_line

__all__ = [
    "load_state_dict_file",
    "unwrap_state_dict",
    "mismatch",
    "load_strict",
    "read_folder_config",
    "folder_kind",
    "save_folder",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "CARD_NAME",
]

CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "card.json"


def unwrap_state_dict(
    obj: object, source: str, prefer: tuple[str, ...] = ("model_ema", "state_dict", "model")
) -> dict[str, torch.Tensor]:
    """The tensor dict inside a training checkpoint (``{'state_dict': …}`` etc.), minus ``module.``."""
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in prefer:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{source}: no state dict of tensors found in the checkpoint")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a weights-only torch checkpoint (on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise ModelLoadError(f"{path}: not a valid safetensors file ({one_line(exc, 160)})") from None
    try:
        with warnings.catch_warnings():  # a plain pickle (not torch.save's) is refused below, in one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(  # torch's wordings: a class not allow-listed; a function of a blocked module
            r"GLOBAL (\S+) was not an allowed global|Unsupported global: GLOBAL (\S+)|unsupported GLOBAL (\S+)", text
        )
        if found:
            what = next(g for g in found.groups() if g)
            raise ModelLoadError(
                f"{path}: refused: the checkpoint holds a {what} object, and loading "
                "it would execute arbitrary pickled code; save only its tensors (a state dict), or convert it to "
                "safetensors"
            ) from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", text, flags=re.S)
        detail = one_line(reason.group(1) if reason else text, 120)
        raise ModelLoadError(
            f"{path}: not a readable torch checkpoint (damaged, or not a checkpoint: {detail})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, IndexError, KeyError) as exc:
        detail = f"{type(exc).__name__}: {one_line(exc, 120)}"  # a bare KeyError says only "105"
        raise ModelLoadError(
            f"{path}: not a readable torch checkpoint (damaged, or not a checkpoint: {detail})"
        ) from None
    return unwrap_state_dict(obj, str(path))


def mismatch(expected: dict[str, tuple], state: dict[str, torch.Tensor]) -> str | None:
    """A one-line account of how ``state`` differs from the expected key → shape layout, or None."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[0]}")
    return "; ".join(parts) or None


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error that names the first mismatches."""
    problem = mismatch({k: tuple(v.shape) for k, v in module.state_dict().items()}, state)
    if problem:
        raise ModelLoadError(f"{source}: checkpoint does not fit the model: {problem}")
    module.load_state_dict(state, strict=True)


def _folder_fields(config: Path) -> dict[str, Any] | None:
    try:
        fields = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config}: not valid JSON ({exc})") from None
    return fields if isinstance(fields, dict) else None


def folder_kind(folder: str | Path) -> str | None:
    """What a model folder holds (``classifier``, ``onestep``), or None when it has no config of ours."""
    config = Path(folder) / CONFIG_NAME
    fields = _folder_fields(config) if config.is_file() else None
    return (fields or {}).get("raysmooth_model")


def read_folder_config(folder: str | Path, kind: str) -> tuple[dict[str, Any], Path]:
    """The saved config of a model folder and its weights file, checked to be a ``kind`` folder."""
    folder = Path(folder)
    config, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: no such model folder")
    if not config.is_file() or not weights.is_file():
        diffusers = (folder / "unet" / "config.json").is_file() or (folder / "model_index.json").is_file()
        what = f"a diffusers denoiser folder, not a {kind} folder; a {kind}" if diffusers else "a model"
        raise ModelLoadError(f"{folder}: {what} folder needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    fields = _folder_fields(config)
    found = (fields or {}).get("raysmooth_model")
    if found != kind:
        raise ModelLoadError(f"{folder}: a {found or 'foreign'} folder where a {kind} folder was expected")
    return {k: v for k, v in fields.items() if k != "raysmooth_model"}, weights


def recover_folder(dst: str | Path) -> Path:
    """Undo a crash between ``replacing_folder``'s two renames: the old folder moved aside is then the
    whole one. Call it before reading ``dst`` (a resume would otherwise miss it)."""
    dst = Path(dst)
    old = dst.with_name(f"_{dst.name}.old")
    if old.exists() and not dst.exists():
        old.rename(dst)
    return dst


def _write_failure(exc: BaseException, dst: Path) -> OSError | None:
    """A failed write (a full disk) as an ``OSError`` naming ``dst``, or None for any other exception:
    safetensors reports the OS error in its own type's message, and a write into an open file names no file."""
    if isinstance(exc, OSError):
        return None if exc.filename else naming(exc, dst)
    found = re.search(r"\(os error (\d+)\)", str(exc)) if type(exc).__name__ == "SafetensorError" else None
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(dst))


@contextlib.contextmanager
def replacing_folder(dst: str | Path) -> Iterator[Path]:
    """A folder to write a model into, beside ``dst``, renamed to ``dst`` once the block ends: a reader
    never sees half a model, and there is never a moment without a whole one (an old ``dst`` is moved
    aside first and removed last; a crash between the two renames is undone by the next call)."""
    dst = recover_folder(dst)
    tmp, old = dst.with_name(f"_{dst.name}.tmp"), dst.with_name(f"_{dst.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written model frees the space a retry needs
        if (failed := _write_failure(exc, dst)) is not None:
            raise failed from exc
        raise
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def save_folder(
    folder: str | Path,
    kind: str,
    fields: dict[str, Any],
    state: dict[str, torch.Tensor],
    card: dict[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ ``card.json``) into a new folder, then rename it
    into place, so a reader never sees half a model."""
    from safetensors.torch import save_file

    with replacing_folder(folder) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / WEIGHTS_NAME))
        (tmp / CONFIG_NAME).write_text(json.dumps({"raysmooth_model": kind, **fields}, indent=2, sort_keys=True) + "\n")
        if card is not None:
            (tmp / CARD_NAME).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return Path(folder)
