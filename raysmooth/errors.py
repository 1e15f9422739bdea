"""User-facing errors: each is printed as one line by the command line and the jobs, never as a traceback."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import math
import numbers
import os
import re
import sys
from collections.abc import Iterable, Mapping

__all__ = [
    "RaySmoothError",
    "ConfigError",
    "InputError",
    "ModelLoadError",
    "ModelError",
    "UserError",
    "one_line",
    "os_error_text",
    "reader_gone",
    "printable_streams",
    "naming",
    "logits_hint",
    "whole_number",
    "finite_number",
    "check_keys",
]

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


class RaySmoothError(Exception):
    """Something the user can fix: a path, a config value, an input. The message says what and where."""


class ConfigError(RaySmoothError, ValueError):
    """A config key or value that cannot work."""


class InputError(RaySmoothError, ValueError):
    """Images, labels or sampling parameters that would give wrong or meaningless certificates."""


class ModelLoadError(RaySmoothError):
    """A checkpoint that is missing, unsafe to load, or does not fit the model it should fill."""


class ModelError(RaySmoothError):
    """A model that fails on the inputs it is given (often a shape it was not built for). Raised from
    the model's own exception, so Python users still see its traceback."""


class UserError(RaySmoothError, ValueError):
    """A mistake in what the user asked for on the command line."""


def one_line(text: object, limit: int = 300) -> str:
    """``text`` as one printable line: terminal escape codes removed (torch colours some of its
    messages), the first non-empty line kept, and cut at ``limit`` characters."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(text)).splitlines() if ln.strip()]
    head = lines[0] if lines else ""
    return head if len(head) <= limit else head[: limit - 1] + "…"


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def os_error_text(exc: OSError, resume: str = "run it again") -> str:
    """An operating-system error as the user should read it: the file it concerns, and for a full disk
    (or quota) that nothing stored is lost and how to carry on, since that is the next question."""
    text = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
    if exc.errno in _DISK_FULL:
        text += f" (the disk is full: what was stored before is kept; free some space and {resume})"
    return text


def printable_streams() -> None:
    """Make stdout and stderr replace what their encoding cannot write (σ in a latin-1 or ASCII locale)
    instead of failing: the table at the end of a long run printed a traceback there."""
    for stream in (sys.stdout, sys.stderr):
        try:
            "σ≥…".encode(getattr(stream, "encoding", None) or "utf-8")
        except (LookupError, UnicodeEncodeError):
            with contextlib.suppress(AttributeError, ValueError, OSError):
                stream.reconfigure(errors="replace")


def reader_gone() -> int:
    """The exit status when whatever read our stdout went away (``raysmooth analyze RUN | head``): quiet,
    as for any command a closed pipe stops, with stdout pointed at /dev/null so that the interpreter's
    last flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (replaced by a caller)
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for such a command


def naming(exc: OSError, target: object) -> OSError:
    """``exc`` naming ``target`` when it names no file: a write into an open file (a full disk) does not."""
    return exc if exc.filename else OSError(exc.errno, exc.strerror or str(exc), str(target))


def logits_hint(out: object) -> str:
    """What to do about a model output that is not a logits tensor but holds one: a transformers model
    returns an output object whose ``.logits`` is what raysmooth counts."""
    if hasattr(getattr(out, "logits", None), "shape"):
        return (
            f"; the {type(out).__name__} it returned has a .logits tensor, as a transformers model's output does: "
            "wrap the module so that its forward returns model(x).logits"
        )
    return ""


def whole_number(name: str, value: object, minimum: int | None = 1, error: type[RaySmoothError] = InputError) -> int:
    """``value`` as an int when it is a whole number (``1e5`` is, ``100.5`` and ``True`` are not) of at
    least ``minimum``: a count, seed or size given as 100.5 is refused rather than quietly truncated."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()  # a 0-d numpy array or torch tensor: its Python number
    whole = None
    if isinstance(value, bool):
        pass
    elif isinstance(value, numbers.Integral):
        whole = int(value)
    elif isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        whole = int(value)
    if whole is None or (minimum is not None and whole < minimum):
        least = "" if minimum is None else f" of at least {minimum}"
        raise error(f"{name} must be a whole number{least}, got {value!r}")
    return whole


def finite_number(name: str, value: object, error: type[RaySmoothError] = InputError) -> float:
    """``value`` as a float when it is a finite real number (not text, None, a bool, NaN or inf): a config
    value YAML handed over as text is refused rather than failing later inside a comparison."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise error(f"{name} must be a finite number, got {value!r}")
    return float(value)


def pixel_size(value: object) -> tuple[int, int] | None:
    """(H, W) from one whole positive size (a square, as timm's img_size) or two; None for anything else
    (16.5 is not truncated, True is not 1, "16" is not a number)."""
    try:
        sizes = [value] if isinstance(value, (str, bytes)) else list(value)  # type: ignore[call-overload]
    except TypeError:  # one number
        sizes = [value]
    try:
        values = [whole_number("size", v) for v in sizes]
    except RaySmoothError:
        return None
    return (values[0], values[-1]) if len(values) in (1, 2) else None


PATH_KEYS = ("path", "weights", "checkpoint")  # keys of a model section that name files or folders


def check_paths_given(section: str, given: Mapping[str, object], keys: Iterable[str] = PATH_KEYS) -> None:
    """An empty path is refused: ``''`` reads as the working directory, or as no path at all (a
    classifier then built from timm with random weights), never as what the user meant."""
    for key in keys:
        value = given.get(key)
        if value is not None and not str(value).strip():
            raise ConfigError(f"{section}.{key} is empty: give a path, or null")


def check_keys(section: str, given: Iterable[str], schema: type) -> None:
    """Refuse a key the dataclass ``schema`` of a config section does not have, naming the one probably
    meant: the dataclass would say "__init__() got an unexpected keyword argument", not where it came from."""
    allowed = [f.name for f in dataclasses.fields(schema)]
    for key in given:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"it takes {', '.join(allowed)}"
            raise ConfigError(f"{section} takes no {key!r} ({hint})")
