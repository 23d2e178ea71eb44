"""The ablation end to end: two real launches of a tiny model, read back into a plot and a table."""

import pytest

from pascal_dist import cli
from pascal_dist.eval.ablation import backend_arms, read_arm


@pytest.mark.slow
def test_tiny_ablation_writes_plot_table_and_side_by_side_runs(tiny_data, tmp_path):
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
    assert cli.main(["ablate", "--out", str(out), "--config", str(cfg), "--nprocs", "1"]) == 0
    png = (out / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = (out / "ablation.md").read_text()
    assert "| pascal |" in md and "| none |" in md and "![validation loss](ablation.png)" in md
    pascal, none = (read_arm(str(out), a) for a in backend_arms())
    assert [s for s, _, _ in pascal.val] == [s for s, _, _ in none.val] == [2, 4, 6]
    assert pascal.theta is not None and none.theta is None  # the arms really ran different backends
    assert pascal.val != none.val
    assert sorted(p.name for p in out.iterdir()) == ["ablation.md", "ablation.png", "none", "pascal"]
