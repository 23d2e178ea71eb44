"""The ablation end to end: three arms on two seeds, real launches of a tiny model, scored on the held-out split
and summarised with paired intervals, a table and plots."""

import json

import pytest

from pascal_dist import cli
from pascal_dist.eval.ablation import backend_arms, read_curves, run_dir


@pytest.mark.slow
def test_tiny_ablation_over_seeds_writes_summary_table_and_plots(tiny_data, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""model: {{vocab_size: 512, block_size: 32, n_layer: 1, n_head: 2, n_embd: 32, dropout: 0.0,
         attn_dropout: 0.0, bias: {{warmup_steps: 4}}}}
data: {{dir: {tiny_data}}}
train: {{micro_batch_size: 4, grad_accum: 1, max_steps: 6, warmup_steps: 2, decay_steps: 6, eval_interval: 2,
        eval_batches: 2, compile: false}}
logging: {{log_interval: 2}}
checkpoint: {{interval: 0}}
""")
    out = tmp_path / "out"
    assert cli.main(["ablate", "--out", str(out), "--config", str(cfg), "--nprocs", "1", "--seeds", "3,4"]) == 0
    for name in ("ablation.png", "theta.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["baseline"] == "none" and sorted(summary["arms"]) == ["learned", "none", "pascal"]
    for arm in ("pascal", "learned"):
        d = summary["arms"][arm]["vs_baseline"]["nll_per_token"]
        finals = summary["finals"]
        diffs = [finals[arm][s]["nll_per_token"] - finals["none"][s]["nll_per_token"] for s in ("3", "4")]
        assert d["n"] == 2 and d["mean"] == pytest.approx(sum(diffs) / 2)
        assert d["low"] < d["mean"] < d["high"]
    assert all(f["tokens"] > 1000 for arm in summary["finals"].values() for f in arm.values())  # the whole split
    md = (out / "ablation.md").read_text()
    assert "| pascal | 2 |" in md and "| learned | 2 |" in md and "(baseline)" in md
    pascal, learned, none = backend_arms()
    curves = {a.name: read_curves(run_dir(str(out), a, 3)) for a in (pascal, learned, none)}
    assert [s for s, _ in curves["pascal"]["val/loss"]] == [2, 4, 6]
    assert "bias/theta" in curves["pascal"] and "bias/band_0" in curves["learned"]  # the arms ran different models
    assert "bias/theta" not in curves["none"] and "bias/band_0" not in curves["none"]
    assert curves["learned"]["bias/band_0"][-1][1] != 0.0  # the learned band moved away from its zero start
    seeds = {p.name for p in (out / "pascal").iterdir()}
    assert seeds == {"seed3", "seed4"}
    assert "--arms" not in summary["command"]

    # A subset of the arms, on runs already finished (resumed, so not retrained): the command records the choice.
    assert (
        cli.main(
            ["ablate", "--out", str(out), "--config", str(cfg), "--nprocs", "1", "--seeds", "3"]
            + ["--arms", "none,pascal"]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["arms"]) == ["none", "pascal"] and "--seeds 3 --arms pascal,none" in summary["command"]
    assert summary["finals"]["pascal"]["3"] == finals["pascal"]["3"]  # the same run, scored again
