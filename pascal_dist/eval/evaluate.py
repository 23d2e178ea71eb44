"""Evaluation on standard terms: sliding-window perplexity (per token and per word) and LAMBADA accuracy.

Perplexity follows the fixed-length-model scheme of the HF docs: windows of block_size tokens start every
`stride` tokens and each window scores only the targets no earlier window scored, so every token after the
first is scored once, with at least block_size - stride tokens of context once the first window is past.
Documents are joined with [EOS] as in training. Per-word perplexity is exp(total NLL / whitespace words of
the text), the normalisation WikiText results are reported in, comparable across tokenizers.

LAMBADA (`last_word_acc`): the target is the passage's whole final word, however many tokens; an example is
correct iff the greedy (argmax) prediction is right at every target token, teacher-forced. `last_token_acc`
is the easier score, argmax right on the passage's final token given every token before it.

Metric functions return sums for this rank's disjoint share of windows/examples; `all_sum` adds them over
ranks. The model is anything whose call gives (logits, _), so tests can use a stub with known logits.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pascal_dist.data.prepare import clean, load_source
from pascal_dist.data.shards import DataError, open_split, read_manifest
from pascal_dist.errors import UsageError
from pascal_dist.eval.export import WEIGHTS, ExportError, export_checkpoint, load_exported, resolve_checkpoint

# exp(709.8) overflows a float64: a diverged model's perplexity is reported as exp(700) ~ 1e304, a (huge) number
# rather than an OverflowError. (The trainer's TensorBoard cap is lower: a float32 scalar.)
PPL_CAP_NATS = 700.0
_LAST_WORD = re.compile(r"^(.*\S)\s+(\S+)\s*$", re.S)


def _device(model: Any) -> torch.device:
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


def all_sum(values: Sequence[float]) -> list[float]:
    """Sum per-rank partial sums over the process group (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


# --- perplexity -------------------------------------------------------------------------------------------
def token_stream(docs: Iterable[str], tokenizer: Any, eos_id: int) -> np.ndarray:
    """Documents encoded and joined as in training: doc ids + [EOS] after each."""
    ids: list[int] = []
    for enc in tokenizer.encode_batch(list(docs), add_special_tokens=False):
        ids += enc.ids + [eos_id]
    return np.asarray(ids, dtype=np.int64)


def sliding_windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored_from): the window feeds tokens[begin:end] and scores the targets with index in
    (scored_from, end], i.e. tokens[scored_from+1 : end+1]; targets are tokens 1..n_tokens-1, each once."""
    if not 1 <= stride <= block_size:
        raise UsageError(f"stride={stride}, expected 1 <= stride <= block_size={block_size}")
    if n_tokens < 2:
        raise DataError(f"{n_tokens} token(s): need at least 2 to score one")
    out, begin, prev = [], 0, 0
    while True:
        end = min(begin + block_size, n_tokens - 1)
        out.append((begin, end, prev))
        if end == n_tokens - 1:
            return out
        prev, begin = end, begin + stride


@torch.no_grad()
def nll_sums(
    model: Any,
    tokens: np.ndarray,
    block_size: int,
    stride: int | None = None,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[float, int]:
    """(total NLL in nats, tokens scored) over this rank's windows (every world_size-th one)."""
    stride = stride or max(block_size // 2, 1)
    windows = sliding_windows(len(tokens), block_size, stride)[rank::world_size]
    device, toks = _device(model), torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        x = torch.zeros(len(chunk), max(e - b for b, e, _ in chunk), dtype=torch.long)
        y, scored = torch.zeros_like(x), torch.zeros_like(x, dtype=torch.bool)
        for r, (b, e, prev) in enumerate(chunk):  # right padding: causal, so it never reaches a scored position
            x[r, : e - b], y[r, : e - b] = toks[b:e], toks[b + 1 : e + 1]
            scored[r, prev - b : e - b] = True
        logits = model(x.to(device))[0].float()
        nll = F.cross_entropy(logits.transpose(1, 2), y.to(device), reduction="none")  # (B, T)
        total += float(nll[scored.to(device)].double().sum())
        count += int(scored.sum())
    return total, count


def perplexities(nll: float, tokens: int, words: int | None) -> dict[str, float | None]:
    return {
        "nll_per_token": nll / tokens,
        "ppl_token": math.exp(min(nll / tokens, PPL_CAP_NATS)),
        "ppl_word": math.exp(min(nll / words, PPL_CAP_NATS)) if words else None,
    }


def count_words(texts: Iterable[str]) -> int:
    return sum(len(t.split()) for t in texts)


def heldout_words(data_dir: str, split: str, tokens_used: int) -> tuple[int | None, str]:
    """Whitespace words of a prepared split's raw documents (counted at preparation), pro rata when only
    `tokens_used` of its tokens are scored; (None, why) for data prepared before words were counted."""
    manifest = read_manifest(data_dir)
    words = manifest.get("words", {}).get(split)
    if words is None:
        return None, "unknown: data prepared without word counts (re-run prepare_data.py)"
    total = sum(entry["tokens"] for entry in manifest["splits"][split])
    if tokens_used >= total:
        return int(words), "raw text, counted at preparation"
    return round(words * tokens_used / total), f"raw text, pro rata for {tokens_used} of {total} tokens"


# --- LAMBADA ----------------------------------------------------------------------------------------------
def lambada_examples(texts: Iterable[str], tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """(context ids, final-word ids) per passage; passages with no context word are an error."""
    out = []
    for text in texts:
        if not (m := _LAST_WORD.match(text)):
            raise DataError(f"LAMBADA passage without a context word: {text[:60]!r}")
        ctx, word = m.groups()
        out.append(
            (tokenizer.encode(ctx, add_special_tokens=False).ids, tokenizer.encode(word, add_special_tokens=False).ids)
        )
    return out


@torch.no_grad()
def lambada_sums(
    model: Any,
    examples: Sequence[tuple[list[int], list[int]]],
    block_size: int,
    batch_size: int = 16,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[int, int, int, int]:
    """(examples, last-word correct, last-token correct, multi-token targets) over this rank's examples."""
    mine, device = list(examples)[rank::world_size], _device(model)
    n = word_ok = token_ok = multi = 0
    for i in range(0, len(mine), batch_size):
        seqs = [(ctx + tgt)[:-1][-block_size:] for ctx, tgt in mine[i : i + batch_size]]
        x = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        for r, s in enumerate(seqs):
            x[r, : len(s)] = torch.tensor(s)
        pred = model(x.to(device))[0].argmax(-1).cpu()  # (B, T)
        for r, ((_, tgt), s) in enumerate(zip(mine[i : i + batch_size], seqs)):
            if len(tgt) > len(s):
                raise DataError(f"final word of {len(tgt)} tokens does not fit block_size {block_size}")
            got = pred[r, len(s) - len(tgt) : len(s)].tolist()
            n, multi = n + 1, multi + (len(tgt) > 1)
            word_ok += got == tgt
            token_ok += got[-1] == tgt[-1]
    return n, word_ok, token_ok, multi


# --- inputs -----------------------------------------------------------------------------------------------
def source_texts(
    source: str | None,
    config: str | None = None,
    split: str = "test",
    files: Sequence[str] | None = None,
    column: str = "text",
    sample_by: str = "paragraph",
    limit: int | None = None,
) -> list[str]:
    """Raw texts of one split of a hub dataset, local dataset dir or local files (one split: 'train')."""
    splits, _ = load_source(source or "files", config, files, sample_by)
    if split not in splits:
        if len(splits) != 1:
            raise DataError(f"source {source or files!r} has no split {split!r}; available: {sorted(splits)}")
        split = next(iter(splits))
    ds = splits[split]
    if column not in ds.column_names:
        raise DataError(
            f"source {source or files!r} split {split!r} has no column {column!r}; available: {ds.column_names}"
        )
    texts = [t for t in ds[column] if t and t.strip()]
    return texts[:limit] if limit else texts


def heldout_tokens(data_dir: str, split: str, vocab_size: int, limit: int | None = None) -> np.ndarray:
    tokens = np.concatenate([np.asarray(s) for s in open_split(data_dir, split, expected_vocab_size=vocab_size)])
    return tokens[:limit].astype(np.int64) if limit else tokens.astype(np.int64)


@dataclass
class Opened:
    """A model ready to score, with where its results go."""

    model: Any
    cfg: Any
    tokenizer: Any
    step: int
    results_dir: str  # the export dir, or the run dir of a checkpoint
    source: str


def open_model(path: str, device: str | torch.device = "cpu") -> Opened:
    """An exported model dir, or a checkpoint (run dir, checkpoints dir, tag dir) exported to a temp dir first."""
    if os.path.isfile(os.path.join(path, WEIGHTS)):
        model, cfg, tok = load_exported(path, device)
        return Opened(model, cfg, tok, int(model.bias_step), path, os.path.abspath(path))
    if not os.path.isdir(path):
        raise ExportError(f"'{path}': no such directory (expected an exported model or a checkpoint)")
    ckpt_dir, tag = resolve_checkpoint(path)
    with tempfile.TemporaryDirectory() as tmp:
        export_checkpoint(path, os.path.join(tmp, "model"))
        model, cfg, tok = load_exported(os.path.join(tmp, "model"), device)
    run_dir = os.path.dirname(ckpt_dir) if os.path.basename(ckpt_dir.rstrip("/")) == "checkpoints" else ckpt_dir
    return Opened(model, cfg, tok, int(model.bias_step), run_dir, os.path.abspath(os.path.join(ckpt_dir, tag)))


# --- reporting and the command line -----------------------------------------------------------------------
def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    rows = ["| set | metric | value |", "|---|---|---|"]
    for name, metrics in results.items():
        for key, v in metrics.items():
            rows.append(f"| {name} | {key} | {v:.4f} |" if isinstance(v, float) else f"| {name} | {key} | {v} |")
    return "\n".join(rows)


def unique_path(directory: str, name: str = "eval_results.json") -> str:
    """`name` in `directory`, or name-<timestamp>[-N] if it exists: earlier results are never overwritten."""
    import time

    stem, ext = os.path.splitext(name)
    path, stamp, n = os.path.join(directory, name), time.strftime("%Y%m%d-%H%M%S"), 1
    while os.path.exists(path):
        path = os.path.join(directory, f"{stem}-{stamp}{'' if n == 1 else f'-{n}'}{ext}")
        n += 1
    return path


@dataclass
class EvalRequest:
    """What to score (the `pascal-dist evaluate` flags, typed). Every count may be limited by `limit`."""

    model: str  # exported model dir, or a run dir / checkpoints dir / checkpoint tag dir
    heldout: bool = True  # perplexity on the held-out split of a prepared data dir
    data_dir: str | None = None  # default: the run's data.dir
    split: str | None = None  # default: the run's data.val_split
    text: str | None = None  # a HF dataset (hub name or local dir), e.g. wikitext
    text_config: str | None = None
    text_split: str = "test"
    text_files: list[str] | None = None  # local .txt/.jsonl/.parquet files instead of `text`
    text_column: str = "text"
    lambada: str | None = None  # hub name (EleutherAI/lambada_openai) or a local .jsonl/.txt file
    lambada_split: str = "test"
    stride: int | None = None  # sliding-window stride; default block_size // 2
    batch_size: int = 8
    limit: int | None = None  # first N tokens (held-out) / documents / passages


def evaluate(args: EvalRequest, rank: int, world_size: int, device: torch.device) -> dict[str, Any]:
    """Every requested metric for the model at args.model; the same dict on every rank."""
    opened = open_model(args.model, device)
    model, cfg, tok = opened.model, opened.cfg, opened.tokenizer
    L, eos = cfg.model.block_size, tok.token_to_id("[EOS]")
    stride, results = args.stride or max(L // 2, 1), {}
    share = dict(rank=rank, world_size=world_size, batch_size=args.batch_size)

    def ppl(name: str, tokens: np.ndarray, words: int | None, **extra: Any) -> None:
        nll, n = all_sum(nll_sums(model, tokens, L, stride, **share))
        results[name] = {
            **perplexities(nll, int(n), words),
            "tokens": int(n),
            "words": words,
            "stride": stride,
            "block_size": L,
            **extra,
        }

    if args.heldout:
        data_dir, split = args.data_dir or cfg.data.dir, args.split or cfg.data.val_split
        tokens = heldout_tokens(data_dir, split, cfg.model.vocab_size, args.limit)
        words, words_from = heldout_words(data_dir, split, len(tokens))
        ppl(f"heldout/{split}", tokens, words, data_dir=data_dir, words_from=words_from)
    if args.text or args.text_files:
        docs = [
            d
            for d in map(
                clean,
                source_texts(
                    args.text, args.text_config, args.text_split, args.text_files, args.text_column, limit=args.limit
                ),
            )
            if d
        ]
        ppl(
            f"text/{args.text or 'files'}",
            token_stream(docs, tok, eos),
            count_words(docs),
            documents=len(docs),
            words_from="raw text",
        )
    if args.lambada:
        is_file = os.path.isfile(args.lambada)
        texts = source_texts(
            None if is_file else args.lambada,
            None,
            args.lambada_split,
            [args.lambada] if is_file else None,
            "text",
            sample_by="line",
            limit=args.limit,
        )
        n, word, token, multi = all_sum(lambada_sums(model, lambada_examples(texts, tok), L, **share))
        results["lambada"] = {
            "examples": int(n),
            "last_word_acc": word / n,
            "last_token_acc": token / n,
            "multi_token_words": multi / n,
            "source": args.lambada,
        }
    return {"model": opened.source, "step": opened.step, "results": results, "results_dir": opened.results_dir}


def save_results(out: dict[str, Any], world_size: int) -> str:
    """Write evaluate()'s result as a new JSON file (never over an earlier one) and as TensorBoard scalars at the
    model's step, both in its results dir; returns the JSON's path. Rank 0 only."""
    import json
    import time

    from pascal_dist.train.metrics import MetricsWriter

    out = dict(out, time=time.strftime("%Y-%m-%dT%H:%M:%S"), world_size=world_size)
    path = unique_path(out["results_dir"])
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    writer = MetricsWriter(os.path.join(out["results_dir"], "tensorboard"), enabled=True)
    writer.scalars(
        {f"eval/{name}/{k}": v for name, m in out["results"].items() for k, v in m.items() if isinstance(v, float)},
        out["step"],
    )
    writer.close()
    return path
