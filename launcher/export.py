"""Export a checkpoint (any ZeRO stage) to safetensors + config + tokenizer, loadable without DeepSpeed.

    python launcher/export.py runs/demo exported/demo        # a run dir, its checkpoints dir, or one tag dir

The same as `pascal-dist export`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from pascal_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
