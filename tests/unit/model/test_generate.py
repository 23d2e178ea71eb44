"""Generation: KV-cache logits equal the full forward at every position, sliding past block_size, sampling."""

import pytest
import torch

from pascal_dist.config.schema import AttentionConfig, BiasConfig, ModelConfig
from pascal_dist.data.prepare import build_tokenizer
from pascal_dist.model import KVCache, PascalGPT
from pascal_dist.model.generate import filter_logits, generate_ids, sample_texts

VOCAB, BLOCK = 97, 16


def model(backend: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> PascalGPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        block_size=BLOCK,
        n_layer=2,
        n_head=2,
        n_embd=32,
        attention=AttentionConfig(backend=backend),
        bias=BiasConfig(warmup_steps=100, theta_init=0.4),
    )
    m = PascalGPT(cfg).to(dtype).eval()
    m.set_bias_step(37)  # alpha mid-warm-up: a cache that used another alpha or theta would not match
    if m.bias is not None:
        m.bias.reset_buffers()
        with torch.no_grad():  # make the band large so that any misplaced diagonal shows in the logits
            m.bias.base.mul_(8.0)
    return m


@pytest.mark.parametrize("backend", ["reference", "sdpa", "none"])
def test_cached_logits_equal_full_forward_at_every_position(backend):
    m = model(backend, dtype=torch.float64)
    idx = torch.randint(0, VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(1))
    full, _ = m(idx)
    for prefill in (1, 5):  # a prompt of several tokens at once, then one token per step
        cache = KVCache(m.cfg.n_layer)
        parts = [m.forward_cached(idx[:, :prefill], cache)]
        parts += [m.forward_cached(idx[:, i : i + 1], cache) for i in range(prefill, BLOCK)]
        torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="exceeds block_size"):
        m.forward_cached(idx[:, :1], cache)


def test_the_bias_matters_for_the_cache():
    """Guards the test above: the Pascal and unbiased models (same weights) give different logits."""
    idx = torch.randint(0, VOCAB, (1, BLOCK), generator=torch.Generator().manual_seed(2))
    assert (model("sdpa")(idx)[0] - model("none")(idx)[0]).abs().max() > 1e-2


def test_sliding_past_block_size_is_a_crop_to_the_last_block():
    """Greedy decoding far past block_size equals nanoGPT's loop: full forward on the last block_size tokens."""
    m = model("sdpa")
    prompt = torch.randint(0, VOCAB, (BLOCK + 7,), generator=torch.Generator().manual_seed(3)).tolist()
    got = generate_ids(m, prompt, 2 * BLOCK, seed=0, temperature=0.0)
    tokens = list(prompt)
    for _ in range(2 * BLOCK):
        tokens.append(int(m(torch.tensor([tokens[-BLOCK:]]))[0][0, -1].argmax()))
    assert got == tokens[len(prompt) :]


def test_a_compiled_model_generates_eagerly():
    """Decoding grows the sequence one token at a time: under a compiled model (the trainer's samples) every new
    length would recompile the head. Generation runs eager, and gives what the uncompiled model gives."""
    from torch._dynamo.testing import CompileCounter

    from pascal_dist.train.engine import compile_model

    torch._dynamo.reset()  # what earlier tests compiled of the same code must not count here
    prompt = torch.randint(0, VOCAB, (5,), generator=torch.Generator().manual_seed(4)).tolist()
    expected = generate_ids(model("sdpa"), prompt, BLOCK, seed=0)
    m, cnt = model("sdpa"), CompileCounter()
    compile_model(m, "blocks", backend=cnt)
    assert generate_ids(m, prompt, BLOCK, seed=0) == expected
    assert cnt.frame_count == 0
    m(torch.tensor([prompt]))  # the compiled regions do compile outside generation
    assert cnt.frame_count == 2


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    keep = lambda x: torch.isfinite(x).nonzero().flatten().tolist()  # noqa: E731
    assert keep(filter_logits(logits, 1.0, 2, None)) == [0, 1]
    assert keep(filter_logits(logits, 1.0, None, 0.8)) == [0, 1, 2]  # 0.5 + 0.2 < 0.8 <= 0.85
    assert keep(filter_logits(logits, 1.0, None, 0.5)) == [0]
    assert keep(filter_logits(logits, 1.0, 4, 0.99)) == [0, 1, 2, 3]
    torch.testing.assert_close(filter_logits(logits, 2.0, None, None), logits / 2)


@pytest.fixture(scope="module")
def tokenizer():
    text = [
        "I think it is a misfortune, my lord, and the king is here.",
        "What light through yonder window breaks? It is the east, and Juliet is the sun.",
    ] * 40
    tok = build_tokenizer(VOCAB, 2, iter(text))
    assert tok.get_vocab_size() <= VOCAB
    return tok


def test_generation_is_reproducible_with_a_seed(tokenizer):
    m = model("sdpa", seed=4)
    m.train()
    prompts = ["I think", "What light"]
    a = sample_texts(m, tokenizer, prompts, 12, seed=7, temperature=1.0, top_k=None)
    assert m.training  # the caller's mode is restored
    assert a == sample_texts(m, tokenizer, prompts, 12, seed=7, temperature=1.0, top_k=None)
    assert a != sample_texts(m, tokenizer, prompts, 12, seed=8, temperature=1.0, top_k=None)
    assert all(t.startswith(p) for t, p in zip(a, prompts))  # the decoder keeps the prompt readable
    assert len(sample_texts(m, tokenizer, [""], 5, seed=1)) == 1  # an empty prompt starts a document
