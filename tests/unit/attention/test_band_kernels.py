"""The fused Triton band kernels against the float64 dense reference and against the PyTorch-ops correction.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, numpy underneath), which executes
the same kernel source with the same masks and strides; it rounds float32 -> bfloat16 by truncation where a
GPU rounds to nearest, so bf16 tolerances here are looser than on CUDA (the `gpu` tests at the end).
"""

import math
import os

import pytest
import torch

from tests.helpers import require_triton

require_triton()
from pascal_dist.attention import band_kernels  # noqa: E402

assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", "conftest sets the interpreter"

import pascal_dist.attention.banded as banded_attention  # noqa: E402
from pascal_dist.attention.banded import _flash_forward  # noqa: E402
from tests.unit.attention.test_banded import (  # noqa: E402
    LABELS,
    assert_compiles_like_eager,
    assert_float32_close,
    build,
    inputs,
    ref64,
    rel_err,
    run_backend,
)

pytestmark = pytest.mark.usefixtures("kernels_take_cpu_tensors")


def banded_on_triton(*args, **kwargs):
    """The `banded` backend with its correction forced onto the Triton kernels (model.attention.kernels=triton)."""
    return run_backend("banded", *args, kernels="triton", **kwargs)


@pytest.mark.parametrize("pascal_n,window", [(3, 1), (3, 3), (4, 3)])
@pytest.mark.parametrize("T,D", [(1, 16), (3, 16), (17, 16), (64, 64), (70, 40)])  # ragged T and D
def test_float32_matches_float64_reference(T, D, pascal_n, window):
    q, k, v, w = inputs(T, D, torch.float32, seed=T + D + window)
    got, ref = banded_on_triton(q, k, v, w, pascal_n, window), ref64(q, k, v, w, pascal_n, window)
    assert all(x.dtype == torch.float32 for x in got)
    assert_float32_close(got, ref, f"T={T} D={D}")


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_matches_float64_reference(dtype, tol):
    q, k, v, w = inputs(64, 64, dtype, seed=11)
    got, ref = banded_on_triton(q, k, v, w, 3, 3), ref64(q, k, v, w, 3, 3)
    for label, x, r in zip(LABELS, got, ref):
        assert rel_err(x, r) < (2 * tol if label.startswith("d") and label != "dv" else tol), (
            f"{dtype} {label}: {rel_err(x, r)}"
        )


def test_every_launch_states_fp_fusion():
    """Triton 3.10 turns FP fusion off by default; the kernels keep the rounding and speed they were tested with."""
    q = torch.empty(1, 2, 64, 64, dtype=torch.bfloat16)
    assert all(band_kernels._launch(q, backward)[1]["enable_fp_fusion"] is True for backward in (False, True))


def test_output_is_laid_out_for_the_output_projection():
    """As flash SDPA's own output: (B, T, H, d) memory, so the model's transpose back copies nothing; the fake
    (what torch.compile plans with) has the same strides."""
    q, k, v = (torch.randn(2, 3, 20, 16) for _ in range(3))
    a = torch.tensor([0.7, 1.4, 0.2])
    o, lse, _ = _flash_forward(q, k, v, 0.25)
    out = band_kernels.band_forward(q, k, v, o, lse, a, 0.25)[0]
    assert out.transpose(1, 2).is_contiguous()
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = band_kernels.band_forward(*(mode.from_tensor(t) for t in (q, k, v, o, lse, a)), 0.25)[0]
    assert fake.stride() == out.stride()


def test_agrees_with_the_pytorch_ops_on_strided_inputs():
    """The model hands over q, k, v as (B, T, H, d) transposed views; both implementations must read them alike."""
    g = torch.Generator().manual_seed(4)
    B, T, H, D = 2, 45, 3, 32
    q, k, v, do = (torch.randn(B, T, H, D, generator=g).transpose(1, 2) for _ in range(4))
    a = torch.tensor([0.5, 1.2, 0.8])
    scale = 1 / math.sqrt(D)
    o, lse, _ = _flash_forward(q, k, v, scale)
    want = banded_attention._torch_band_forward(q, k, v, o, lse, a, scale)
    got = band_kernels.band_forward(q, k, v, o, lse, a, scale)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    out, lse2 = want
    dq, dk, dv = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    want = banded_attention._torch_band_backward(q, k, v, out, lse2, do, dq, dk, dv, a, scale)
    got = band_kernels.band_backward(q, k, v, out, lse2, do, dq, dk, dv, a, scale)
    for label, x, y in zip(["dq", "dk", "dv", "da"], got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=label)


def test_band_gradient_is_bitwise_reproducible():
    """d a is reduced from per-program partials in a fixed order, not by atomics."""
    q, k, v, w = inputs(70, 16, torch.float32, seed=2)
    first, second = (banded_on_triton(q, k, v, w, 3, 3) for _ in range(2))
    for label, x, y in zip(LABELS, first, second):
        assert torch.equal(x, y), label


def test_model_compiles_with_the_kernels_as_opaque_ops():
    """torch.compile sees each kernel as one custom op (fake shapes), with no graph break."""
    assert_compiles_like_eager(build("banded", kernels="triton").train())


# --- on a GPU: the real kernels, bf16, long sequences, head dims 64 and 128 ---------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T,D", [(256, 64), (1000, 64), (1024, 128), (4096, 64)])
def test_cuda_bf16_matches_float64_reference(T, D):
    q, k, v, w = inputs(T, D, torch.float32, seed=T + D, B=1, H=2)
    ref = ref64(q, k, v, w, 3, 3)  # on the CPU, float64
    q, k, v, w = (t.cuda().bfloat16() for t in (q, k, v, w))
    assert banded_attention._use_triton(q, "auto")
    got = run_backend("banded", q, k, v, w, 3, 3)
    for label, x, r in zip(LABELS, got, ref):
        err = rel_err(x, r)
        assert err < (2e-2 if label in ("dtheta", "dband") else 1e-2), f"T={T} D={D} {label}: {err}"
