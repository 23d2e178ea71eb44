"""Text generation: sampling (temperature, top-k, top-p) over the KV-cached decoder, seeded and reproducible.

The context is the last block_size tokens, as in training. Positions are learned absolute embeddings, so
when the cache is full the window slides by re-encoding the last block_size tokens at positions 0.. (what
nanoGPT's crop does); before that, each new token costs one cached step.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch
from torch import Tensor

from pascal_dist.errors import UsageError
from pascal_dist.model import KVCache, PascalGPT

# what the WordPiece decoder's cleanup misses, as it sees one piece at a time: "liv ' d" -> "liv'd", " ;" -> ";"
_ELISION, _BEFORE = re.compile(r"(\w) ' (\w)"), re.compile(r" ([;:])")


def filter_logits(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """Scaled logits (vocab,) with everything outside the top-k and the top-p nucleus set to -inf."""
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def next_token(logits: Tensor, gen: torch.Generator, temperature: float, top_k: int | None, top_p: float | None) -> int:
    """One token from the last position's logits (vocab,); temperature 0 is greedy. Sampled on the CPU in
    float32 so that a seed gives the same text whatever the model's device."""
    logits = logits.detach().float().cpu()
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # a regionally compiled model's head would recompile for each new length
def generate_ids(
    model: PascalGPT,
    prompt: Sequence[int],
    max_new_tokens: int,
    seed: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    eos_id: int | None = None,
) -> list[int]:
    """The new token ids after `prompt` (stops early at eos_id, which is not returned)."""
    if not prompt:
        raise UsageError("empty prompt: give at least one token")
    block = model.cfg.block_size
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    tokens, out = list(prompt), []
    cache = KVCache(model.cfg.n_layer)
    logits = model.forward_cached(torch.tensor([tokens[-block:]], device=device), cache)[0, -1]
    for _ in range(max_new_tokens):
        tok = next_token(logits, gen, temperature, top_k, top_p)
        if tok == eos_id:
            break
        tokens.append(tok)
        out.append(tok)
        if cache.length < block:
            step = torch.tensor([[tok]], device=device)
        else:  # slide: re-encode the last block_size tokens from position 0
            cache, step = KVCache(model.cfg.n_layer), torch.tensor([tokens[-block:]], device=device)
        logits = model.forward_cached(step, cache)[0, -1]
    return out


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return _BEFORE.sub(r"\1", _ELISION.sub(r"\1'\2", tokenizer.decode(list(ids))))


def generate_text(
    model: PascalGPT, tokenizer: Any, prompt: str, max_new_tokens: int, seed: int, **sampling: Any
) -> str:
    """Prompt -> prompt followed by the generated continuation, decoded."""
    eos = tokenizer.token_to_id("[EOS]")
    # an empty prompt starts a fresh document: in training every document follows an [EOS]
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [eos]
    new = generate_ids(model, ids, max_new_tokens, seed, eos_id=eos, **sampling)
    return decode(tokenizer, ids + new)


def sample_texts(
    model: PascalGPT,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    seed: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
) -> list[str]:
    """One continuation per prompt, prompt i sampled with a generator seeded with seed + i: a pure function of
    (weights, bias step, prompts, settings), so samples logged at successive evaluations are comparable.
    The model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        return [
            generate_text(
                model, tokenizer, p, max_new_tokens, seed + i, temperature=temperature, top_k=top_k, top_p=top_p
            )
            for i, p in enumerate(prompts)
        ]
    finally:
        model.train(was_training)
