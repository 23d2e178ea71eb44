"""Attention backends: causal attention plus the Pascal band, behind one registry of named backends.

A backend turns the band vector a (window,) into whatever its kernel wants ONCE per model forward (`prepare`,
shared by all layers), then runs each layer (`attend`). The registered backends:

  reference  dense softmax(QK^T/sqrt(hs) + bias + causal) V, softmax in float32; the oracle, any device
  sdpa       F.scaled_dot_product_attention with the bias as a float mask (memory-efficient kernel)
  none       F.scaled_dot_product_attention(is_causal=True), no bias: the ablation baseline
  banded     causal flash attention + the exact banded correction (Triton kernels on CUDA, PyTorch ops
             elsewhere; `kernels` picks)
  fused      one Triton flash kernel with the band and attention dropout in its inner loop (imported when first
             built: it needs Triton and a GPU or Triton's interpreter)

A new backend is a class with the `name / uses_band / prepare / attend` members of `AttentionBackend`, registered
with `register_backend(name, factory)`; config validation accepts every registered name, so it can be trained.
"""

from __future__ import annotations

from typing import Callable

from pascal_dist.attention.banded import BandedBackend
from pascal_dist.attention.base import (
    AttentionBackend,
    attend_cached,
    band_matrix,
    band_vector,
    dense_mask_bytes,
    fused_unavailable_reason,
    triton_installed,
)
from pascal_dist.attention.dense import NoBiasBackend, ReferenceBackend, SdpaBackend

__all__ = [
    "AttentionBackend",
    "KERNEL_CHOICES",
    "attend_cached",
    "backend_names",
    "band_matrix",
    "band_vector",
    "dense_mask_bytes",
    "fused_unavailable_reason",
    "get_backend",
    "register_backend",
    "runnable_backend",
    "triton_installed",
]

KERNEL_CHOICES = ("auto", "triton", "torch")  # model.attention.kernels
"""auto: each backend's best implementation for the device; triton / torch: force one where a backend has both."""

BackendFactory = Callable[[str], AttentionBackend]  # kernels -> a backend
_FACTORIES: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make `name` buildable (and valid in model.attention.backend); factory(kernels) returns the backend."""
    _FACTORIES[name] = factory


def unregister_backend(name: str) -> None:
    _FACTORIES.pop(name, None)


def backend_names() -> list[str]:
    return sorted(_FACTORIES)


def _fused(kernels: str) -> AttentionBackend:
    reason = fused_unavailable_reason()
    if reason:
        raise ValueError(f"attention backend 'fused' {reason}")
    from pascal_dist.attention.fused import FusedBackend  # imports Triton: only when asked for

    return FusedBackend()


register_backend("reference", lambda kernels: ReferenceBackend())
register_backend("sdpa", lambda kernels: SdpaBackend())
register_backend("none", lambda kernels: NoBiasBackend())
register_backend("banded", BandedBackend)
register_backend("fused", _fused)


def get_backend(name: str, kernels: str = "auto") -> AttentionBackend:
    """A new instance of backend `name`; ValueError naming the valid ones if there is none."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown attention backend {name!r}; valid: {', '.join(backend_names())}")
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"unknown attention kernels {kernels!r}; valid: {', '.join(KERNEL_CHOICES)}")
    return _FACTORIES[name](kernels)


def runnable_backend(name: str) -> str:
    """`name`, or the exact equivalent that runs on this machine: a model trained with `fused` on GPUs is
    evaluated, exported or sampled with `banded` (same function) where there is no GPU."""
    if name == "fused" and fused_unavailable_reason() is not None:
        return "banded"
    return name
