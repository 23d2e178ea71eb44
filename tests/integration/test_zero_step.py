"""DeepSpeed's ZeRO step without its redundant work: how a step meets a non-finite gradient, and the gradient norm."""

import math

import pytest

from tests.helpers import run_torchrun

# One process of a 2-rank run (torchrun, gloo): four engine steps of a tiny model, rank 1's theta gradient made
# infinite at step 2 (the loss stays finite). Reports what the test checks.


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_non_finite_gradient_on_one_rank_skips_the_step_everywhere(tmp_path, stage):
    """With DeepSpeed's per-tensor overflow scan replaced by its norm check (ZeRO-1/2, bf16) and that norm computed
    for-each (every stage), an inf in one gradient on one rank still skips that step on every rank and leaves the
    weights as they were; the norm is DeepSpeed's, in fewer ops; and the scan's ops are gone from the step."""
    results = run_torchrun(tmp_path, "zero_step", str(stage))
    for r in results:
        h = r["history"]
        assert [s["skipped"] for s in h] == [0, 0, 1, 1]
        assert h[2]["theta"] == h[1]["theta"] != h[0]["theta"] and h[3]["theta"] != h[2]["theta"]
        assert all(math.isfinite(s["loss"]) and math.isfinite(s["theta"]) for s in h)
        n = r["norms"]  # the for-each gradient norm: DeepSpeed's value, in fewer ops
        assert n["foreach"] == pytest.approx(n["deepspeed"], rel=1e-6) and n["foreach"] > 0
        # DeepSpeed: an fp64 copy and a norm per tensor; here one for-each norm per parameter group
        assert n["deepspeed_ops"] - n["foreach_ops"] == 2 * n["tensors"] - n["groups"], n
        # ZeRO-1/2 also lose the overflow scan (ZeRO-3 in bf16 has none)
        assert r["counts"]["with"] < r["counts"]["without"] * (0.85 if stage in (1, 2) else 1), r["counts"]
    same = [[(s["theta"], s["skipped"]) for s in r["history"]] for r in results]
    assert same[0] == same[1]
