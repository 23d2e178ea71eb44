"""Prepare a data directory (token shards, tokenizer, manifest): see `--help` and pascal_dist.data.prepare."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from pascal_dist.data.prepare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
