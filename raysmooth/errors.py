"""User-facing errors: each is printed as one line by the command line and the jobs, never as a traceback."""

from __future__ import annotations

import re

__all__ = ["RaySmoothError", "ConfigError", "InputError", "ModelLoadError", "UserError", "one_line"]

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


class RaySmoothError(Exception):
    """Something the user can fix: a path, a config value, an input. The message says what and where."""


class ConfigError(RaySmoothError, ValueError):
    """A config key or value that cannot work."""


class InputError(RaySmoothError, ValueError):
    """Images, labels or sampling parameters that would give wrong or meaningless certificates."""


class ModelLoadError(RaySmoothError):
    """A checkpoint that is missing, unsafe to load, or does not fit the model it should fill."""


class UserError(RaySmoothError, ValueError):
    """A mistake in what the user asked for on the command line."""


def one_line(text: object, limit: int = 300) -> str:
    """``text`` as one printable line: terminal escape codes removed (torch colours some of its
    messages), the first non-empty line kept, and cut at ``limit`` characters."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(text)).splitlines() if ln.strip()]
    head = lines[0] if lines else ""
    return head if len(head) <= limit else head[: limit - 1] + "…"
