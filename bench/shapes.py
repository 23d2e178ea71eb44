"""The model-shape options the benchmarks share (layers, width, heads, T, batch, vocab) and the config they make."""

from __future__ import annotations

import argparse

from pascal_dist.config.schema import AttentionConfig, ModelConfig

CPU_SIZED = dict(n_layer=4, n_embd=256, n_head=4, block_size=128, batch=8)
SPEC = dict(
    n_layer=12, n_embd=768, n_head=12, block_size=256, batch=64
)  # configs/spec.yaml: the reference model, micro batch


def add_shape_args(p: argparse.ArgumentParser, defaults: dict) -> None:
    """--n-layer --n-embd --n-head --block-size --batch --vocab, with `defaults` (CPU_SIZED or SPEC)."""
    for name in ("n_layer", "n_embd", "n_head", "block_size", "batch"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=defaults[name])
    p.add_argument("--vocab", type=int, default=8192)


def model_config(a: argparse.Namespace, backend: str, dropout: float = 0.0) -> ModelConfig:
    """The model of the shape options, with `backend` ('name' or 'name:kernels', e.g. banded:torch, for
    model.attention.kernels) and the same residual and attention dropout."""
    name, _, kernels = backend.partition(":")
    return ModelConfig(
        vocab_size=a.vocab,
        block_size=a.block_size,
        n_layer=a.n_layer,
        n_head=a.n_head,
        n_embd=a.n_embd,
        dropout=dropout,
        attn_dropout=dropout,
        attention=AttentionConfig(backend=name, kernels=kernels or "auto"),
    )
