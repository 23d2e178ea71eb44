"""Generate text from a checkpoint or exported model (KV cache; temperature, top-k, top-p; seeded).

    python launcher/generate.py runs/demo --prompt "To be, or not" --max-new-tokens 60

The same as `pascal-dist generate`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from pascal_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
