"""The ablation's arms, its paired statistics against a hand-computed example, the arms of a seed sharing initial
weights and data order, and its command line's bad input (the real launches: tests/integration)."""

import math

import pytest
import torch

from pascal_dist import cli
from pascal_dist.config import load_config
from pascal_dist.eval.ablation import backend_arms, paired_interval, summarize, table, warmup_arms
from pascal_dist.model import PascalGPT
from pascal_dist.train.trainer import seed_everything


def main(argv):
    return cli.main(["ablate", *argv])


def test_arms_differ_only_in_their_setting():
    pascal, learned, none = backend_arms()
    assert pascal.overrides == ["model.attention.backend=sdpa", "model.bias.kind=pascal"]
    assert learned.overrides == ["model.attention.backend=sdpa", "model.bias.kind=learned"]
    assert none.overrides == ["model.attention.backend=none"]
    assert [a.overrides[-1] for a in warmup_arms([0, 50])] == [
        "model.bias.warmup_steps=0",
        "model.bias.warmup_steps=50",
    ]


def test_arms_option_picks_a_subset_in_the_standard_order():
    assert [a.name for a in cli._backend_arms("none,pascal", backend_arms())] == ["pascal", "none"]
    for bad in ("pascal,learned", "none,none", "pascal,none,extra"):
        with pytest.raises(cli.UsageError, match="--arms"):
            cli._backend_arms(bad, backend_arms())


def test_paired_interval_against_a_hand_computed_example():
    """Differences -0.10, -0.20, -0.05: mean -0.116667, sd sqrt(0.0116667 / 2) = 0.0763763, standard error
    0.0763763 / sqrt(3) = 0.0440959; t(0.975, 2 dof) = 4.302653 from the tables, half width 0.189729."""
    got = paired_interval([4.90, 5.00, 5.05], [5.00, 5.20, 5.10])
    assert got["n"] == 3
    assert got["mean"] == pytest.approx(-0.116667, abs=1e-6)
    assert got["sd"] == pytest.approx(0.0763763, abs=1e-6)
    assert (got["low"], got["high"]) == (pytest.approx(-0.306396, abs=1e-5), pytest.approx(0.073062, abs=1e-5))


def test_summary_pairs_by_seed_and_states_the_verdict():
    finals = {
        "pascal": {1: {"nll_per_token": 4.9, "ppl_word": 100.0}, 2: {"nll_per_token": 5.0, "ppl_word": 110.0}},
        "none": {1: {"nll_per_token": 5.0, "ppl_word": 120.0}, 2: {"nll_per_token": 5.2, "ppl_word": 125.0}},
    }
    s = summarize(finals, baseline="none")
    assert s["arms"]["none"]["nll_per_token"] == {"mean": pytest.approx(5.1), "sd": pytest.approx(math.sqrt(0.02))}
    d = s["arms"]["pascal"]["vs_baseline"]["nll_per_token"]
    assert (d["n"], d["mean"]) == (2, pytest.approx(-0.15))  # pairs (4.9 - 5.0) and (5.0 - 5.2), not the means
    assert d["high"] > 0  # two seeds: the t(0.975, 1) = 12.7 interval spans zero
    assert "no significant difference" in table(s)


def test_the_arms_of_a_seed_share_initial_weights_and_data_order(tiny_data):
    """Built as the trainer builds them (seed_everything(train.seed), then the model), every arm of a seed starts from
    the same weights wherever their parameters coincide, and reads the same data: only the bias differs."""
    from pascal_dist.data import TrainLoader

    tiny = ["model.vocab_size=512", "model.block_size=32", "model.n_layer=2", "model.n_head=2", "model.n_embd=32"]
    for seed in (1, 2):
        weights, batches = {}, {}
        for arm in backend_arms():
            cfg = load_config(None, [*tiny, f"data.dir={tiny_data}", *arm.overrides, f"train.seed={seed}"])
            seed_everything(cfg.train.seed)
            weights[arm.name] = PascalGPT(cfg.model).state_dict()
            loader = TrainLoader(cfg.data.dir, "train", 32, 4, 1, 0, 1, cfg.train.seed)
            batches[arm.name] = loader.next_batch()[0]
        shared = set.intersection(*(set(w) for w in weights.values()))
        assert "wte.weight" in shared and "bias.theta" not in shared
        for name in ("learned", "none"):
            assert all(torch.equal(weights["pascal"][k], weights[name][k]) for k in shared), (seed, name)
            assert torch.equal(batches["pascal"], batches[name])
    assert not torch.equal(weights["pascal"]["wte.weight"], PascalGPT(cfg.model).state_dict()["wte.weight"])


def test_bad_input_exits_2(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--config", str(tmp_path / "missing.yaml")]) == 2
    assert main(["--out", str(tmp_path), "--sweep-warmup", "0,x"]) == 2
    assert main(["--out", str(tmp_path), "--seeds", "1,1"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 3
