"""raysmooth: certify image classifiers with (diffusion denoised) randomized smoothing, on Ray.

The Python API (``Smoothed``, ``Certificate``) imports torch on first use, so the command line's
statistics and analysis start without it.
"""

__version__ = "0.2.0"

__all__ = ["Smoothed", "Certificate", "Prediction", "__version__"]


def __getattr__(name: str):
    if name in ("Smoothed", "Certificate", "Prediction"):
        from . import smoothed

        return getattr(smoothed, name)
    raise AttributeError(f"module 'raysmooth' has no attribute {name!r}")
