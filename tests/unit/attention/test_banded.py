"""The `banded` backend (flash + exact band correction) against an independent float64 dense reference."""

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from pascal_dist.attention import get_backend
from pascal_dist.attention.banded import BandedFlashAttention
from pascal_dist.config.schema import AttentionConfig, BiasConfig, ModelConfig
from pascal_dist.model import KVCache, PascalGPT
from pascal_dist.model.bias import PascalBias

WARMUP, STEP, THETA = 4000, 1800, -0.7  # alpha = 0.4555: mid warm-up
ALPHA = 0.01 + 0.99 * STEP / WARMUP


def spec_band64(theta: torch.Tensor, pascal_n: int, window: int) -> torch.Tensor:
    """alpha * B'(theta) on distances 0..window-1, float64: log(1 + C(n, d)) times the skip factor per
    token skipped (for n = 3, window 3: log 2, log 4, log 4 exp(-exp(theta)))."""
    skip = torch.exp(-torch.exp(theta.reshape(())))
    return torch.stack([ALPHA * math.log1p(math.comb(pascal_n, d)) * skip ** max(d - 1, 0) for d in range(window)])


def dense64(q, k, v, band, keep=None, p=0.0):
    """softmax(q k^T / sqrt(d) + band + causal) v, dropout by an explicit keep-mask."""
    T = q.size(-2)
    d = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    bias = torch.zeros(T, T, dtype=torch.float64).masked_fill(d < 0, -math.inf)
    for m in range(band.numel()):
        bias = bias + torch.where(d == m, band[m], 0.0)
    att = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1)) + bias, dim=-1)
    if keep is not None:
        att = att * keep.double() / (1 - p)
    return att @ v


def inputs(T, D, dtype, seed, B=2, H=3):
    g = torch.Generator().manual_seed(seed)
    return [(2 * torch.randn(B, H, T, D, generator=g)).to(dtype) for _ in range(3)] + [
        torch.randn(B, H, T, D, generator=g).to(dtype)
    ]  # q, k, v scaled up: peakier softmax, bigger band terms


def ref64(q, k, v, w, pascal_n, window, keep=None, p=0.0):
    """Output and grads (q, k, v, theta, band) of the float64 reference, on the CPU whatever q's device."""
    q, k, v = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    theta = torch.tensor([THETA], dtype=torch.float64, requires_grad=True)
    band = spec_band64(theta, pascal_n, window)
    band.retain_grad()
    out = dense64(q, k, v, band, None if keep is None else keep.cpu(), p)
    (out * w.cpu().double()).sum().backward()
    dtheta = torch.zeros(1, dtype=torch.float64) if theta.grad is None else theta.grad
    return out.detach(), q.grad, k.grad, v.grad, dtheta, band.grad


def run_backend(name, q, k, v, w, pascal_n, window, p=0.0, kernels="auto"):
    """Output and grads (q, k, v, theta, band) of attention backend `name`; the bias lives on q's device."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    bias = PascalBias(BiasConfig(pascal_n=pascal_n, window=window, theta_init=THETA, warmup_steps=WARMUP))
    bias = bias.to(q.device)
    band = bias(torch.tensor(STEP, device=q.device))
    band.retain_grad()
    be = get_backend(name, kernels)
    out = be.attend(q, k, v, be.prepare(band, q.size(-2), q.device, q.dtype), p)
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad, bias.theta.grad, band.grad


def rel_err(x, ref):
    return ((x.detach().cpu().double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def assert_float32_close(got, ref, msg=""):
    """float32 results against the float64 reference; band and theta grads are sums over B*H*T terms, so the
    absolute slack scales with the largest entry."""
    for label, x, r in zip(LABELS, got, ref):
        tol = 1e-4 * r.abs().max().item()
        torch.testing.assert_close(x.double(), r, rtol=1e-4, atol=max(2e-5, tol), msg=f"{msg} {label}")


LABELS = ["out", "dq", "dk", "dv", "dtheta", "dband"]


@pytest.mark.parametrize("pascal_n,window", [(3, 1), (3, 2), (3, 3), (4, 3)])
@pytest.mark.parametrize("D", [16, 64])
@pytest.mark.parametrize("T", [1, 2, 3, 17, 64])
def test_float32_matches_float64_reference(T, D, pascal_n, window):
    q, k, v, w = inputs(T, D, torch.float32, seed=T + D + window)
    got, ref = run_backend("banded", q, k, v, w, pascal_n, window), ref64(q, k, v, w, pascal_n, window)
    assert all(x.dtype == torch.float32 for x in got)
    assert_float32_close(got, ref, f"T={T} D={D}")


def test_correction_is_not_a_no_op():
    """The band terms matter at this size: plain causal flash misses the reference by far more than the tolerance."""
    q, k, v, w = inputs(17, 16, torch.float32, seed=5)
    ref = ref64(q, k, v, w, 3, 3)[0]
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert rel_err(plain, ref) > 1e-2


@pytest.mark.parametrize("T", [3, 17, 64])
def test_bf16_matches_float64_reference(T):
    q, k, v, w = inputs(T, 64, torch.bfloat16, seed=T)
    got, ref = run_backend("banded", q, k, v, w, 3, 3), ref64(q, k, v, w, 3, 3)
    for label, x, r in zip(LABELS[:4], got, ref):
        assert x.dtype == torch.bfloat16
        assert rel_err(x, r) < 1e-2, f"T={T} {label}: {rel_err(x, r)}"
    assert rel_err(got[4], ref[4]) < 2e-2, f"T={T} dtheta: {got[4].item()} vs {ref[4].item()}"


def test_gradcheck_float64():
    """Finite differences on the Function itself (float64 flash on CPU), band vector included."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    a = torch.tensor([0.3, 0.9, 0.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(BandedFlashAttention.apply, (q, k, v, a))


def test_saves_no_t_by_t_tensor():
    T, B, H, D = 64, 2, 3, 16
    q, k, v, _ = (t.requires_grad_() for t in inputs(T, D, torch.float32, seed=0, B=B, H=H))
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = BandedFlashAttention.apply(q, k, v, torch.tensor([0.3, 0.6, 0.4], requires_grad=True))
    assert shapes, "the hook saw nothing: the test would pass vacuously"
    assert max(math.prod(s) for s in shapes) <= B * H * T * D, shapes
    assert not any(s.count(T) >= 2 for s in shapes), shapes
    out.sum().backward()


def test_dropout_falls_back_to_exact_dense_path():
    q, k, v, _ = inputs(8, 16, torch.float32, seed=1)
    be = get_backend("banded")
    prep = be.prepare(torch.tensor([0.7, 1.4, 1.1]), 8, q.device, q.dtype)
    with pytest.warns(UserWarning, match="attn_dropout"):
        dropped = be.attend(q, k, v, prep, 0.5)
    assert not torch.allclose(dropped, be.attend(q, k, v, prep, 0.0))


# --- the full model -------------------------------------------------------------------------------

VOCAB = 97


def build(backend: str, n_layer: int = 2, kernels: str = "auto", **kw) -> PascalGPT:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        block_size=32,
        n_layer=n_layer,
        n_head=2,
        n_embd=32,
        dropout=0.0,
        attn_dropout=0.0,
        attention=AttentionConfig(backend=backend, kernels=kernels),
        bias=BiasConfig(warmup_steps=100),
        **kw,
    )
    m = PascalGPT(cfg)
    m.set_bias_step(50)
    return m


def batch(B=3, T=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T), generator=g), torch.randint(0, VOCAB, (B, T), generator=g)


def loss_and_grads(m, idx, tgt, fwd=None):
    _, loss = (m if fwd is None else fwd)(idx, tgt)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in m.named_parameters()}


def test_model_equals_reference_backend():
    idx, tgt = batch()
    (l0, g0), (l1, g1) = (loss_and_grads(build(b).train(), idx, tgt) for b in ("reference", "banded"))
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    assert g0.keys() == g1.keys() and "bias.theta" in g1 and g1["bias.theta"].abs().item() > 0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-7, msg=name)


def test_kv_cache_generation_matches_forward():
    m = build("banded").eval()
    idx, _ = batch(B=2, T=12)
    full = m(idx)[0]
    cache = KVCache(len(m.blocks))
    steps = [m.forward_cached(idx[:, :5], cache)] + [m.forward_cached(idx[:, t : t + 1], cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def assert_compiles_like_eager(m):
    """No graph break; one compiled frame (AOT autograd traces forward and backward); loss and grads as eager."""
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


def test_compiles_without_graph_breaks_and_matches_eager():
    assert_compiles_like_eager(build("banded").train())


def test_cpu_autocast_bf16():
    m = build("banded").train()
    idx, tgt = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = m(idx)[0], m(idx, tgt)[1]
    loss.backward()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert torch.isfinite(m.bias.theta.grad).all() and m.bias.theta.grad.abs().item() > 0
