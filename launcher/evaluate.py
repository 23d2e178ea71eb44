"""Evaluate a checkpoint or exported model: perplexity (per token, per word; sliding window) and LAMBADA.

    python launcher/evaluate.py runs/demo                                   # held-out split of the run's data
    python launcher/evaluate.py exported/demo --text wikitext --text-config wikitext-103-raw-v1 \\
        --lambada EleutherAI/lambada_openai --no-heldout
    torchrun --nproc_per_node 2 launcher/evaluate.py runs/demo              # ranks score disjoint windows

The same as `pascal-dist evaluate`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from pascal_dist.cli import main, run_rank  # noqa: E402

if __name__ == "__main__":
    run_rank(main, ["evaluate", *sys.argv[1:]])
