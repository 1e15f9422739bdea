"""raysmooth: certify image classifiers with (diffusion denoised) randomized smoothing, on Ray."""

__version__ = "0.1.0"
