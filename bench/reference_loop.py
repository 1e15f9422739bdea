"""The per-image sampling loop the reference codebases use (Cohen et al.'s ``_sample_noise``, which
the denoised-smoothing repositories copy): for each image a separate n0 pass and an n pass, each in
batches of the image repeated, noise drawn with ``randn_like``, the argmax counted in a Python loop.
Written here from the published description, for the benchmarks only."""

from __future__ import annotations

import time

import numpy as np
import torch


def reference_certify_counts(base, images, sigma: float, n0: int, n: int, batch: int, device: str) -> float:
    """Seconds for the selection and estimation counts of every image, as the reference computes them."""
    start = time.perf_counter()
    with torch.no_grad():
        for x in images:
            for budget in (n0, n):
                counts = np.zeros(base.num_classes, dtype=int)
                remaining = budget
                while remaining > 0:
                    b = min(batch, remaining)
                    remaining -= b
                    xb = x.repeat((b, 1, 1, 1))
                    noise = torch.randn_like(xb) * sigma
                    labels = base(xb + noise, torch.full((b,), sigma, device=device)).argmax(1).cpu().numpy()
                    for idx in labels:
                        counts[idx] += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start
