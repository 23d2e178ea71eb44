"""Evaluation: perplexity against independent computations, sliding windows, LAMBADA on a stub, the CLI."""

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pascal_dist.config import to_yaml
from pascal_dist.config.schema import AttentionConfig, BiasConfig, ModelConfig, RunConfig
from pascal_dist.data.shards import DataError
from pascal_dist.eval.evaluate import (
    count_words,
    lambada_examples,
    lambada_sums,
    nll_sums,
    perplexities,
    sliding_windows,
    token_stream,
)
from pascal_dist.model import PascalGPT
from tests.helpers import read_scalars


def main(argv):
    from pascal_dist import cli

    return cli.main(["evaluate", *argv])


VOCAB, BLOCK = 61, 16


@pytest.fixture(scope="module")
def tiny() -> PascalGPT:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        block_size=BLOCK,
        n_layer=2,
        n_head=2,
        n_embd=32,
        attention=AttentionConfig(backend="sdpa"),
        bias=BiasConfig(warmup_steps=10),
    )
    m = PascalGPT(cfg).eval()
    m.set_bias_step(10)
    return m


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n)


def log_prob(model: PascalGPT, context: list[int], target: int) -> float:
    """log p(target | context), the model run on exactly that context."""
    with torch.no_grad():
        logits = model(torch.tensor([context]))[0][0, -1].double()
    return float(torch.log_softmax(logits, -1)[target])


def test_perplexity_is_exp_of_the_mean_nll(tiny):
    t = tokens(BLOCK + 1)
    with torch.no_grad():
        logits = tiny(torch.tensor(t[None, :-1]))[0][0].double()
    mean_nll = -torch.log_softmax(logits, -1)[torch.arange(BLOCK), torch.tensor(t[1:])].mean().item()
    nll, n = nll_sums(tiny, t, BLOCK)
    assert n == BLOCK
    assert perplexities(nll, n, None)["ppl_token"] == pytest.approx(math.exp(mean_nll), rel=1e-5)
    for stride in (1, 5, BLOCK):  # the text fits one window: the stride changes nothing
        assert nll_sums(tiny, t, BLOCK, stride) == pytest.approx((nll, n), rel=1e-6)


@pytest.mark.parametrize("stride", [3, 8, BLOCK])
def test_sliding_window_equals_per_token_brute_force(tiny, stride):
    """Target t is scored once, by the first window that reaches it: context tokens[b:t], b a multiple of stride."""
    t = tokens(3 * BLOCK + 5, seed=1).tolist()
    want = 0.0
    for i in range(1, len(t)):
        b = max(0, math.ceil((i - BLOCK) / stride)) * stride
        want -= log_prob(tiny, t[b:i], t[i])
    nll, n = nll_sums(tiny, np.array(t), BLOCK, stride, batch_size=3)
    assert n == len(t) - 1 and nll == pytest.approx(want, rel=1e-5)
    shards = [nll_sums(tiny, np.array(t), BLOCK, stride, rank=r, world_size=3) for r in range(3)]
    assert sum(s[0] for s in shards) == pytest.approx(nll, rel=1e-6) and sum(s[1] for s in shards) == n


def test_sliding_windows_bounds():
    assert sliding_windows(10, 4, 2) == [(0, 4, 0), (2, 6, 4), (4, 8, 6), (6, 9, 8)]
    with pytest.raises(ValueError, match="stride=5"):
        sliding_windows(10, 4, 5)
    with pytest.raises(DataError, match="at least 2"):
        sliding_windows(1, 4, 2)


class Words:
    """Stub tokenizer: a word 'a-b-c' is the tokens a, b, c."""

    def encode(self, text, add_special_tokens=False):
        return SimpleNamespace(ids=[int(p) for w in text.split() for p in w.split("-")])

    def encode_batch(self, texts, add_special_tokens=False):
        return [self.encode(t) for t in texts]


def test_word_level_normalisation():
    docs = ["1 2 3-4", "5-6-7 8\n9"]  # 3 + 3 whitespace words; 9 tokens + 2 [EOS]
    stream = token_stream(docs, Words(), eos_id=0)
    assert stream.tolist() == [1, 2, 3, 4, 0, 5, 6, 7, 8, 9, 0] and count_words(docs) == 6
    p = perplexities(nll=12.0, tokens=10, words=6)
    assert p["ppl_word"] == pytest.approx(math.exp(2.0)) and p["ppl_token"] == pytest.approx(math.exp(1.2))


class NextIsPlusOne:
    """Stub LM with known predictions: argmax after token x is (x + 1) % 10."""

    def __call__(self, x):
        return F.one_hot((x + 1) % 10, 10).float(), None


def test_lambada_whole_word_vs_last_token():
    texts = [
        "1 2 3-4-5",  # every piece predicted: word right, last token right
        "1 2 3-7-8",  # 7 is wrong, 8 right after the (teacher-forced) 7: word wrong, last token right
        "1 2 9",  # word wrong, token wrong
        "5   6-7\n",
    ]  # word right
    ex = lambada_examples(texts, Words())
    assert ex[1] == ([1, 2], [3, 7, 8]) and ex[3] == ([5], [6, 7])
    assert lambada_sums(NextIsPlusOne(), ex, block_size=8, batch_size=3) == (4, 2, 3, 3)
    parts = [lambada_sums(NextIsPlusOne(), ex, 8, rank=r, world_size=2) for r in range(2)]
    assert tuple(map(sum, zip(*parts))) == (4, 2, 3, 3)
    assert lambada_sums(NextIsPlusOne(), ex[:1], block_size=3) == (1, 1, 1, 1)  # context cut to fit
    with pytest.raises(DataError, match="does not fit"):
        lambada_sums(NextIsPlusOne(), ex[:1], block_size=2)
    with pytest.raises(DataError, match="without a context word"):
        lambada_examples(["alone"], Words())


@pytest.fixture
def exported(tiny, tiny_data, tmp_path):
    """An exported-model directory, made by hand: the weights, a config on tiny_data and its tokenizer."""
    from safetensors.torch import save_model

    torch.manual_seed(1)
    cfg = RunConfig()
    cfg.model = ModelConfig(vocab_size=512, block_size=32, n_layer=1, n_head=2, n_embd=16)
    cfg.data.dir = tiny_data
    out = tmp_path / "export"
    out.mkdir()
    save_model(PascalGPT(cfg.model), str(out / "model.safetensors"))
    (out / "config.yaml").write_text(to_yaml(cfg))
    (out / "tokenizer.json").write_bytes((open(os.path.join(tiny_data, "tokenizer.json"), "rb")).read())
    return out


def test_cli_writes_table_json_and_tensorboard(exported, tmp_path, capsys):
    lamb = tmp_path / "lambada.jsonl"
    lamb.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in ["The king is dead and the queen", "Good night sweet prince"])
    )
    text = tmp_path / "doc.txt"
    text.write_text("Now is the winter of our discontent\n\nMade glorious summer by this sun of York.\n")
    args = [str(exported), "--limit", "2000", "--text-files", str(text), "--lambada", str(lamb), "--stride", "8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| heldout/val | ppl_token |" in out and "| lambada | last_word_acc |" in out
    res = json.loads((exported / "eval_results.json").read_text())["results"]
    assert res["heldout/val"]["tokens"] == 1999 and res["text/files"]["words"] == 15
    assert res["lambada"]["examples"] == 2 and 1.0 < res["text/files"]["ppl_token"] < 10_000
    step = json.loads((exported / "eval_results.json").read_text())["step"]
    for name, metrics in res.items():  # every float metric, read back from the event files
        for key, value in metrics.items():
            if isinstance(value, float):
                assert read_scalars(str(exported), f"eval/{name}/{key}") == [(step, pytest.approx(value, rel=1e-6))]
    assert main(args) == 0  # a second run never overwrites the first
    assert len([f for f in os.listdir(exported) if f.startswith("eval_results")]) == 2


def test_cli_bad_input_is_one_line_and_exit_2(exported, tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert main([str(exported), "--stride", "99"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "nope" in err[0] and "stride=99" in err[1]
