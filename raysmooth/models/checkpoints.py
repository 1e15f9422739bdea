"""Loading weights without ever executing a pickle: safetensors, or ``torch.load(weights_only=True)``."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..errors import ModelLoadError

__all__ = ["load_state_dict_file", "unwrap_state_dict", "mismatch", "load_strict"]


def unwrap_state_dict(obj: object, source: str, prefer: tuple[str, ...] = ("model_ema", "state_dict", "model")) -> dict[str, torch.Tensor]:
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
            raise ModelLoadError(f"{path}: not a valid safetensors file ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported pickle content"
        raise ModelLoadError(
            f"{path}: refused: the checkpoint holds more than tensors and would need arbitrary pickled code "
            f"to load ({first[:160]}); convert it to safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ModelLoadError(f"{path}: not a readable torch checkpoint ({str(exc).splitlines()[0][:160]})") from None
    return unwrap_state_dict(obj, str(path))


def mismatch(expected: dict[str, tuple], state: dict[str, torch.Tensor]) -> str | None:
    """A one-line account of how ``state`` differs from the expected key → shape layout, or None."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v)]
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
