#!/usr/bin/env python
"""Train Atlas: `accelerate launch train.py --config configs/train_config.yaml --report_to wandb`.

Flags: `--config FILE`, dotted overrides (`--training.learning_rate 1e-4`) and diffusers-style
aliases (`--learning_rate 1e-4`, `--mixed_precision bf16`, `--resume_from_checkpoint latest`, ...);
`python train.py --help` lists them.
"""

import sys

from atlas_vla.training.train import main

if __name__ == "__main__":
    sys.exit(main())
