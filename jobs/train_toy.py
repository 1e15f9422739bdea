"""Train the embedded digits models (denoiser, classifier, noise-augmented classifier, one-step).

    python jobs/train_toy.py [--out DIR] [--seed 0] [--quick]

Writes safetensors + JSON cards; the committed copies in raysmooth/embedded/digits came from this
script with its defaults (about 7 minutes on 2 CPU cores).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysmooth.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train-toy", *sys.argv[1:]]))
