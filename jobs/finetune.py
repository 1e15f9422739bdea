"""Fine-tune a diffusion denoiser for the cascade (Brier + anti-consistency losses).

python jobs/finetune.py [key=value …]     e.g. steps=3000 lora_rank=4 out=/tmp/ft
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysmooth.apps import finetune_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(finetune_main())
