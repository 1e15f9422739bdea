"""Certify a test set with randomized smoothing on Ray.

python jobs/certify.py [key=value …]
ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/certify.py out=/shared/runs/x …
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a Ray job's working_dir needs no install

from raysmooth.apps import certify_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(certify_main())
