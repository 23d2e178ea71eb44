"""The fused Triton band kernels against the float64 dense reference and against the PyTorch-ops correction.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, numpy underneath), which executes
the same kernel source with the same masks and strides; it rounds float32 -> bfloat16 by truncation where a
GPU rounds to nearest, so bf16 tolerances here are looser than on CUDA (the `gpu` tests at the end).
"""
import math
import os

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

try:
    import triton  # noqa: F401
except ImportError:
    if os.environ.get("CI") == "true":
        raise  # `.[dev]` installs it: in CI a skip would hide the kernels from every check
    pytest.skip("Triton is not installed", allow_module_level=True)
from pascal_dist import band_kernels  # noqa: E402
assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", "conftest sets the interpreter"

import pascal_dist.banded_attention as banded_attention  # noqa: E402
from pascal_dist.attention import get_backend  # noqa: E402
from pascal_dist.banded_attention import _flash_forward  # noqa: E402
from pascal_dist.bias import PascalBias  # noqa: E402
from pascal_dist.schema import BiasConfig  # noqa: E402
from tests.test_banded_attention import (LABELS, STEP, THETA, WARMUP, batch, build, inputs,  # noqa: E402
                                         loss_and_grads, ref64)
from tests.test_banded_attention import banded as banded_run  # noqa: E402



@pytest.fixture(autouse=True)
def interpreter_only(request):
    """The CPU tests hand CPU tensors to the kernels: only Triton's interpreter takes those. On a GPU machine the
    `gpu`-marked tests check the compiled kernels instead."""
    if torch.cuda.is_available() and request.node.get_closest_marker("gpu") is None:
        pytest.skip("runs the kernels in Triton's CPU interpreter; on a GPU the `gpu` tests cover them")

@pytest.fixture
def triton_kernels(monkeypatch):
    monkeypatch.setattr(banded_attention, "KERNELS", "triton")


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("pascal_n,window", [(3, 1), (3, 3), (4, 3)])
@pytest.mark.parametrize("T,D", [(1, 16), (3, 16), (17, 16), (64, 64), (70, 40)])  # ragged T and D
def test_float32_matches_float64_reference(triton_kernels, T, D, pascal_n, window):
    q, k, v, w = inputs(T, D, torch.float32, seed=T + D + window)
    got, ref = banded_run(q, k, v, w, pascal_n, window), ref64(q, k, v, w, pascal_n, window)
    for label, x, r in zip(LABELS, got, ref):
        assert x.dtype == torch.float32, label
        tol = 1e-4 * r.abs().max().item()  # band and theta grads are sums over B*H*T terms
        torch.testing.assert_close(x.double(), r, rtol=1e-4, atol=max(2e-5, tol), msg=f"T={T} D={D} {label}")


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_matches_float64_reference(triton_kernels, dtype, tol):
    q, k, v, w = inputs(64, 64, dtype, seed=11)
    got, ref = banded_run(q, k, v, w, 3, 3), ref64(q, k, v, w, 3, 3)
    for label, x, r in zip(LABELS, got, ref):
        assert rel_err(x, r) < (2 * tol if label.startswith("d") and label != "dv" else tol), \
            f"{dtype} {label}: {rel_err(x, r)}"


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


def test_band_gradient_is_bitwise_reproducible(triton_kernels):
    """d a is reduced from per-program partials in a fixed order, not by atomics."""
    q, k, v, w = inputs(70, 16, torch.float32, seed=2)
    first, second = banded_run(q, k, v, w, 3, 3), banded_run(q, k, v, w, 3, 3)
    for label, x, y in zip(LABELS, first, second):
        assert torch.equal(x, y), label


def test_model_compiles_with_the_kernels_as_opaque_ops(triton_kernels):
    """torch.compile sees each kernel as one custom op (fake shapes), with no graph break."""
    m = build("banded").train()
    idx, tgt = batch()
    explanation = torch._dynamo.explain(m)(idx, tgt)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    l0, g0 = loss_and_grads(m, idx, tgt)
    m.zero_grad(set_to_none=True)
    cnt = CompileCounterWithBackend("aot_eager")
    l1, g1 = loss_and_grads(m, idx, tgt, torch.compile(m, backend=cnt))
    assert cnt.frame_count == 1
    torch.testing.assert_close(l1, l0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


# --- on a GPU: the real kernels, bf16, long sequences, head dims 64 and 128 ---------------------------------

def cuda_banded(q, k, v, w):
    """banded_run on the GPU: the bias module lives with the model, on the same device."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    bias = PascalBias(BiasConfig(pascal_n=3, window=3, theta_init=THETA, warmup_steps=WARMUP)).cuda()
    band = bias(torch.tensor(STEP, device="cuda"))
    band.retain_grad()
    be = get_backend("banded")
    out = be.attend(q, k, v, be.prepare(band, q.size(-2), q.device, q.dtype), 0.0)
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad, bias.theta.grad, band.grad


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T,D", [(256, 64), (1000, 64), (1024, 128), (4096, 64)])
def test_cuda_bf16_matches_float64_reference(T, D):
    q, k, v, w = inputs(T, D, torch.float32, seed=T + D, B=1, H=2)
    ref = ref64(q, k, v, w, 3, 3)  # on the CPU, float64
    q, k, v, w = (t.cuda().bfloat16() for t in (q, k, v, w))
    assert banded_attention._use_triton(q)
    got = cuda_banded(q, k, v, w)
    for label, x, r in zip(LABELS, got, ref):
        err = rel_err(x.cpu(), r)
        assert err < (2e-2 if label in ("dtheta", "dband") else 1e-2), f"T={T} D={D} {label}: {err}"
