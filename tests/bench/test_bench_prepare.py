"""bench/bench_prepare_scale.py runs small and prints its tables, every output byte-identical to its reference (the
speeds themselves are not checked here: docs/benchmarks.md has them, measured on a quiet machine)."""

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def test_bench_prepare_scale_tables_and_identical_outputs():
    proc = subprocess.run(
        [sys.executable, "bench/bench_prepare_scale.py", "--tokens", "1", "--plays", "2", "--repeat", "2"],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    identical = {r.split("|")[1].strip(): r.split("|")[6].strip() for r in rows if r.count("|") == 7}
    identical.pop("run")  # the header
    identical = {k.replace(" (all cores)", ""): v for k, v in identical.items() if not k.startswith("defaults")}
    assert identical == {
        "`--workers 1`": "(the reference)",
        "`--workers 2`": "yes",
        "`--streaming`, all cores": "yes (shards, tokenizer)",
        "2 x `--part i/2 --streaming --workers 1` side by side": "",
        "`--merge` of the 2 parts": "",
        "parts + merge": "yes, to `--streaming`",
    }, rows
    assert "| 16 | streamed | 8 x 8 |" in proc.stdout
