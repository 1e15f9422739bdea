"""User-facing errors: each is printed as one line by the command line and the jobs, never as a traceback."""


class RaySmoothError(Exception):
    """Something the user can fix: a path, a config value, an input. The message says what and where."""


class ConfigError(RaySmoothError, ValueError):
    """A config key or value that cannot work."""


class InputError(RaySmoothError, ValueError):
    """Images, labels or sampling parameters that would give wrong or meaningless certificates."""


class ModelLoadError(RaySmoothError):
    """A checkpoint that is missing, unsafe to load, or does not fit the model it should fill."""
