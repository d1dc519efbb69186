"""`python -m atlas_vla.train`: the training entry point (same as `train.py` and `atlas-vla-train`)."""

import sys

from atlas_vla.training.train import main

if __name__ == "__main__":
    sys.exit(main())
