"""Attention backends against an independent float64 softmax(QK^T/sqrt(d) + alpha B'(theta) + causal) V."""

import math

import pytest
import torch
import torch.nn.functional as F

from pascal_dist.attention import backend_names, band_matrix, get_backend, register_backend, unregister_backend
from pascal_dist.attention.dense import SdpaBackend
from pascal_dist.config.schema import BiasConfig
from pascal_dist.model.bias import PascalBias

WARMUP, STEP, THETA = 4000, 3000, -0.7  # alpha = 0.7525: away from both ends of the ramp


def spec_bias(T: int, theta: torch.Tensor, a: float) -> torch.Tensor:
    """alpha * B'(theta) + causal mask from the closed form, float64."""
    skip = math.log(4) * torch.exp(-torch.exp(theta))
    rows = []
    for i in range(T):
        row = []
        for j in range(T):
            d = i - j
            row.append(
                torch.tensor(-math.inf, dtype=torch.float64)
                if d < 0
                else a * torch.tensor([math.log(2), math.log(4)][d], dtype=torch.float64)
                if d < 2
                else a * skip.reshape(())
                if d == 2
                else torch.tensor(0.0, dtype=torch.float64)
            )
        rows.append(torch.stack(row))
    return torch.stack(rows)  # (T, T)


def dense64(q, k, v, bias):
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1)) + bias
    return torch.softmax(att, dim=-1) @ v


def causal64(q, k, v):
    T = q.size(-2)
    mask = torch.full((T, T), -math.inf, dtype=torch.float64).triu(1)
    return dense64(q, k, v, mask)


def make_qkvw(T, dtype, seed=0, B=2, H=3, D=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(4)]


def run_ref64(q, k, v, w):
    """Output and grads (q, k, v, theta) of the float64 reference at the same inputs."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    theta = torch.tensor(THETA, dtype=torch.float64, requires_grad=True)
    a = 0.01 + 0.99 * min(STEP / WARMUP, 1.0)
    out = dense64(q, k, v, spec_bias(q.size(-2), theta, a))
    (out * w.double()).sum().backward()
    dtheta = torch.zeros(1, dtype=torch.float64) if theta.grad is None else theta.grad.reshape(1)
    return out.detach(), q.grad, k.grad, v.grad, dtheta


def run_backend(name, q, k, v, w):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    bias = PascalBias(BiasConfig(pascal_n=3, window=3, theta_init=THETA, warmup_steps=WARMUP))
    be = get_backend(name)
    out = be.attend(q, k, v, be.prepare(bias(torch.tensor(STEP)), q.size(-2), q.device, q.dtype), 0.0)
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad, bias.theta.grad


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def test_band_matrix_is_spec_closed_form():
    theta = torch.tensor(THETA, dtype=torch.float64)
    bias = PascalBias(BiasConfig(theta_init=THETA, warmup_steps=WARMUP)).double()
    a = 0.01 + 0.99 * STEP / WARMUP
    got = band_matrix(bias(torch.tensor(STEP)), 7, torch.device("cpu"))
    torch.testing.assert_close(got, spec_bias(7, theta, a))


@pytest.mark.parametrize("name", ["reference", "sdpa"])
@pytest.mark.parametrize("T", [1, 2, 3, 17])
def test_pascal_backends_float32(name, T):
    q, k, v, w = make_qkvw(T, torch.float32, seed=T)
    got, ref = run_backend(name, q, k, v, w), run_ref64(q, k, v, w)
    labels = ["out", "dq", "dk", "dv", "dtheta"]
    for label, x, r in zip(labels, got, ref):
        torch.testing.assert_close(x.double(), r, rtol=1e-4, atol=2e-5, msg=f"{name} T={T} {label}")


@pytest.mark.parametrize("name", ["reference", "sdpa"])
@pytest.mark.parametrize("T", [3, 17, 64])
def test_pascal_backends_bf16(name, T):
    q, k, v, w = make_qkvw(T, torch.bfloat16, seed=T)
    got, ref = run_backend(name, q, k, v, w), run_ref64(q, k, v, w)
    for label, x, r in zip(["out", "dq", "dk", "dv"], got, ref):
        assert x.dtype == torch.bfloat16
        assert rel_err(x, r) < 1e-2, f"{name} T={T} {label}: {rel_err(x, r)}"
    # theta's gradient is a sum over the whole skip diagonal of bf16 terms
    assert rel_err(got[4], ref[4]) < 2e-2, f"{name} T={T} dtheta: {got[4].item()} vs {ref[4].item()}"


@pytest.mark.parametrize("T", [1, 2, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_none_is_plain_causal(T, dtype):
    q, k, v, _ = make_qkvw(T, dtype, seed=T)
    be = get_backend("none")
    assert not be.uses_band
    out = be.attend(q, k, v, be.prepare(None, T, q.device, dtype), 0.0)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), causal64(q.double(), k.double(), v.double()), rtol=1e-4, atol=1e-5)
    else:
        assert rel_err(out, causal64(q.double(), k.double(), v.double())) < 1.5e-2


def test_zero_band_is_plain_causal():
    q, k, v, _ = make_qkvw(9, torch.float32)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for name in ("reference", "sdpa"):
        be = get_backend(name)
        out = be.attend(q, k, v, be.prepare(torch.zeros(3), 9, q.device, q.dtype), 0.0)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_dropout_only_when_asked():
    q, k, v, _ = make_qkvw(8, torch.float32)
    band = torch.tensor([0.7, 1.4, 1.1])
    for name in [n for n in backend_names() if n != "fused"]:  # fused: tests/unit/attention/test_fused.py
        be = get_backend(name)
        prep = be.prepare(band, 8, q.device, q.dtype)
        torch.testing.assert_close(be.attend(q, k, v, prep, 0.0), be.attend(q, k, v, prep, 0.0))
        assert not torch.allclose(be.attend(q, k, v, prep, 0.5), be.attend(q, k, v, prep, 0.0))


def test_registry():
    with pytest.raises(ValueError, match="banded, fused, none, reference, sdpa"):
        get_backend("flash")
    with pytest.raises(ValueError, match="unknown attention kernels 'cuda'"):
        get_backend("banded", "cuda")
    assert get_backend("banded", "torch").kernels == "torch"


def test_a_registered_backend_passes_config_validation_and_trains():
    """The extension point end to end: a backend registered by name is valid in model.attention.backend, and the
    model it builds runs forward and backward through it."""
    from pascal_dist.config import ConfigError, load_config
    from pascal_dist.model import PascalGPT

    calls = []

    class CountingSdpa(SdpaBackend):
        name = "counting"

        def attend(self, q, k, v, prepared, dropout_p):
            calls.append(q.shape)
            return super().attend(q, k, v, prepared, dropout_p)

    tiny = ["model.vocab_size=32", "model.block_size=8", "model.n_layer=2", "model.n_head=2", "model.n_embd=16"]
    with pytest.raises(ConfigError, match="model.attention.backend must be one of .*got 'counting'"):
        load_config(None, tiny + ["model.attention.backend=counting"])
    register_backend("counting", lambda kernels: CountingSdpa())
    try:
        cfg = load_config(None, tiny + ["model.attention.backend=counting"])
        model = PascalGPT(cfg.model)
        idx = torch.randint(0, 32, (2, 8))
        _, loss = model(idx, idx)
        loss.backward()
        assert len(calls) == 2 and model.bias.theta.grad is not None
    finally:
        unregister_backend("counting")
    assert "counting" not in backend_names()
