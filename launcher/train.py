"""Train the Pascal-biased decoder: config -> data -> model -> ZeRO engine -> checkpoints and metrics.

    deepspeed --num_gpus 8 launcher/train.py --ds_config configs/zero2.json [--config configs/X.yaml] [key=value ...]

The same as `pascal-dist train`; the loop is pascal_dist.train.trainer.Trainer.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from pascal_dist.cli import main, run_rank  # noqa: E402

if __name__ == "__main__":
    run_rank(main, ["train", *sys.argv[1:]])
