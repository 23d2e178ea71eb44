"""The ablation: two real launches of a tiny model, read back into a plot and a table; the TensorBoard reader."""
import math

import pytest

from pascal_dist.ablation import ArmResult, backend_arms, main, read_arm, table, warmup_arms


def test_arms_differ_only_in_their_setting():
    pascal, none = backend_arms()
    assert pascal.overrides == ["model.attention.backend=sdpa"] and none.overrides == ["model.attention.backend=none"]
    assert [a.overrides[1] for a in warmup_arms([0, 50])] == ["model.bias.warmup_steps=0", "model.bias.warmup_steps=50"]


def test_table_reports_the_best_validation_loss():
    r = ArmResult("pascal", [(10, 5.0, 3.0), (20, 9.0, 2.5), (30, 14.0, 2.7)], 1234.0, -1.4, ["x=1"])
    row = table([r]).splitlines()[2]
    assert f"| 2.5000 | 20 | {math.exp(2.5):.2f} | 2.7000 | 14 | 1,234 | -1.400 |" in row


def test_bad_input_exits_2(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--config", str(tmp_path / "missing.yaml")]) == 2
    assert main(["--out", str(tmp_path), "--sweep-warmup", "0,x"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


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
    assert main(["--out", str(out), "--config", str(cfg), "--nprocs", "1"]) == 0
    png = (out / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = (out / "ablation.md").read_text()
    assert "| pascal |" in md and "| none |" in md and "![validation loss](ablation.png)" in md
    pascal, none = (read_arm(str(out), a) for a in backend_arms())
    assert [s for s, _, _ in pascal.val] == [s for s, _, _ in none.val] == [2, 4, 6]
    assert pascal.theta is not None and none.theta is None  # the arms really ran different backends
    assert pascal.val != none.val
    assert sorted(p.name for p in out.iterdir()) == ["ablation.md", "ablation.png", "none", "pascal"]
