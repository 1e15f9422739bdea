"""Certificates for a grid of p0 and α (the cascade, each σ's CERTIFY) from a run's stored counts; no sampling.

python jobs/sweep.py run_dir=RUN_DIR p0=0.5:0.95:0.05 [alpha=[0.001]] [policy=strict|reference]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysmooth.apps import sweep_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(sweep_main())
