"""Train the Pascal-biased decoder: config -> data -> model -> ZeRO engine -> checkpoints and metrics.

    deepspeed --num_gpus 8 launcher/train.py --ds_config configs/zero2.json [--config configs/X.yaml] [key=value ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from pascal_dist.cli import run_rank, train_main  # noqa: E402

if __name__ == "__main__":
    run_rank(train_main, sys.argv[1:])
