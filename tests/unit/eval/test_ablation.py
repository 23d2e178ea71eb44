"""The ablation's arms, its summary table and its command line's bad input (the real launches: tests/integration)."""

import math

from pascal_dist import cli
from pascal_dist.eval.ablation import ArmResult, backend_arms, table, warmup_arms


def main(argv):
    return cli.main(["ablate", *argv])


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
