"""Ablation in one command: Pascal bias vs none (or a bias.warmup_steps sweep), same seed, data and budget.

    python launcher/ablate.py --out runs/ablation                                  # configs/ablation.yaml, 2 ranks
    python launcher/ablate.py --out runs/warmup --sweep-warmup 0,50,200 train.max_steps=200
    tensorboard --logdir runs/ablation

The same as `pascal-dist ablate`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from pascal_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["ablate", *sys.argv[1:]]))
