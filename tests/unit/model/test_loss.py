"""The chunked linear cross-entropy: exact against float64, chunk-invariant, compile-friendly, and small in memory."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from pascal_dist.model.loss import chunk_tokens, linear_cross_entropy


def inputs(N: int, d: int, V: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, d, generator=g) * 0.5).to(dtype).requires_grad_()  # logits of a few units: a real softmax
    return h, w, torch.randint(0, V, (N,), generator=g)


def ref64(h, w, t, scale):
    h64, w64 = (x.detach().double().requires_grad_() for x in (h, w))
    loss = F.cross_entropy(h64 @ w64.t(), t)
    (loss * scale).backward()
    return loss, h64.grad, w64.grad


def max_rel(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("N,chunk", [(64, 64), (64, 16), (37, 8), (5, 100)])  # one chunk, even, ragged, larger
def test_matches_float64(dtype, tol, N, chunk):
    h, w, t = inputs(N, 24, 70, dtype)
    loss = linear_cross_entropy(h, w, t, chunk=chunk)
    (loss * 0.37).backward()  # the upstream gradient (a GAS divisor, a loss scale) multiplies both gradients
    ref, dh, dw = ref64(h, w, t, 0.37)
    assert loss.dtype == torch.float32 and h.grad.dtype == dtype and w.grad.dtype == dtype
    assert abs(loss.item() - ref.item()) < tol * ref.item()
    assert max_rel(h.grad, dh) < tol and max_rel(w.grad, dw) < tol


def test_chunking_does_not_change_the_result():
    h, w, t = inputs(50, 16, 40, torch.float32)
    results = []
    for chunk in (50, 7, 1):
        loss = linear_cross_entropy(h, w, t, chunk=chunk)
        gh, gw = torch.autograd.grad(loss, (h, w))
        results.append((loss, gh, gw))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_autocast_rounds_logits_like_nn_linear():
    """Under autocast (the plain loop) fp32 inputs run the matmuls in bf16 and get fp32 gradients back."""
    h, w, t = inputs(40, 32, 60, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, chunk=16)
        ref = F.cross_entropy(F.linear(h, w).float(), t)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)  # the same bf16-rounded logits
    gh, gw = torch.autograd.grad(loss, (h, w))
    rh, rw = torch.autograd.grad(ref, (h, w))
    assert gh.dtype == gw.dtype == torch.float32
    assert max_rel(gh, rh.double()) < 2e-2 and max_rel(gw, rw.double()) < 2e-2


def test_without_grad_only_the_loss():
    h, w, t = inputs(30, 16, 40, torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t, chunk=8)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, linear_cross_entropy(h, w, t, chunk=8).detach())


def test_float64_stays_float64_under_autocast():
    """Autocast leaves float64 matmuls alone, and so does the loss (a float64 reference inside an autocast region)."""
    h, w, t = inputs(37, 24, 70, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, chunk=8)
    ref, _, _ = ref64(h, w, t, 1.0)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)


def test_double_backward_is_refused():
    """The gradients are computed in forward, so create_graph=True could only return gradients without a graph:
    a gradient penalty built on them would silently lose its own gradient."""
    h, w, t = inputs(16, 8, 20, torch.float64)
    loss = linear_cross_entropy(h, w, t, chunk=8)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(loss, h, create_graph=True)


def test_compiles_without_graph_breaks():
    h, w, t = inputs(48, 16, 40, torch.float32)
    fn = torch.compile(
        lambda h, w, t: linear_cross_entropy(h, w, t, chunk=16), backend="aot_eager_decomp_partition", fullgraph=True
    )
    loss = fn(h, w, t)
    gh, gw = torch.autograd.grad(loss * 2, (h, w))
    ref = linear_cross_entropy(h, w, t, chunk=16)
    rh, rw = torch.autograd.grad(ref * 2, (h, w))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)


def peak_bytes(fn, N: int, d: int, V: int) -> int:
    """Peak bytes allocated by fn(h, w, t) forward and backward, on fake tensors (bf16)."""
    with FakeTensorMode():
        h = torch.randn(N, d, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(V, d, dtype=torch.bfloat16, requires_grad=True)
        t = torch.randint(0, V, (N,))
        tracker = MemTracker()
        tracker.track_external(h, w)
        with tracker:
            fn(h, w, t).backward()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
        return next(v for k, v in peak.items() if str(k).endswith("Total"))


def test_logits_are_never_whole():
    N, d, V = 16384, 64, 8192  # the reference batch's tokens and vocab, a narrow width
    fp32_logits = N * V * 4
    chunked = peak_bytes(linear_cross_entropy, N, d, V)
    unchunked = peak_bytes(lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t), N, d, V)
    assert unchunked > 2 * fp32_logits  # the usual head keeps an fp32 copy and its log-softmax
    print(f"peak MiB: chunked {chunked / 2**20:.0f}, unchunked {unchunked / 2**20:.0f}")
    # one chunk's fp32 softmax and its bf16 copies (on a CPU the transposed matmul copies its operand)
    assert chunked < 2.5 * chunk_tokens(V) * V * 4 and chunked < unchunked / 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_and_compiled_match_float64():
    h, w, t = (x.cuda() for x in inputs(3000, 64, 512, torch.float32, seed=3))
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    ref, dh, dw = ref64(h, w, t, 1.0)
    for fn in (linear_cross_entropy, torch.compile(linear_cross_entropy)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(h, w, t, chunk=1024)
        gh, gw = torch.autograd.grad(loss, (h, w))
        assert abs(loss.item() - ref.item()) < 1e-2 * ref.item()
        assert max_rel(gh, dh) < 2e-2 and max_rel(gw, dw) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_loss_scale_above_the_fp16_range():
    """An fp16 loss scale / tokens above 65504 (fp16's largest) still gives finite, exact gradients when the scaled
    gradients themselves fit: the scale is applied in fp32, not first rounded to fp16 (where it is inf)."""
    h, w, t = inputs(16, 24, 70, torch.float32, seed=4)
    h, w = (x.detach().mul(s).half().cuda().requires_grad_() for x, s in ((h, 1.0), (w, 0.01)))
    scale = 2.0**21  # / 16 tokens = 131072
    loss = linear_cross_entropy(h, w, t.cuda(), chunk=8)
    gh, gw = torch.autograd.grad(loss * scale, (h, w))
    _, dh, dw = ref64(h, w, t.cuda(), scale)
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
    assert max_rel(gh, dh) < 5e-3 and max_rel(gw, dw) < 5e-3
