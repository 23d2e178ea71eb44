"""Export a checkpoint (any ZeRO stage) to safetensors + config + tokenizer, loadable without DeepSpeed.

    python launcher/export.py runs/demo exported/demo        # a run dir, its checkpoints dir, or one tag dir
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from pascal_dist.config import ConfigError  # noqa: E402
from pascal_dist.export import ExportError, export_checkpoint  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="run dir, checkpoints dir or checkpoint tag dir")
    p.add_argument("out", help="new directory for model.safetensors, config.yaml, tokenizer.json")
    args = p.parse_args(argv)
    try:
        print(export_checkpoint(args.checkpoint, args.out))
    except (ExportError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
