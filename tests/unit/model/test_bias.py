"""Pascal coefficients, the band vector and the warm-up schedule against their closed forms."""

import math

import pytest
import torch

from pascal_dist.attention import get_backend
from pascal_dist.config.schema import BiasConfig
from pascal_dist.model.bias import PascalBias, alpha, band_base, pyramid_layer


@pytest.mark.parametrize("n", range(13))
def test_pyramid_is_trinomial(n):
    layer = pyramid_layer(n)
    assert len(layer) == n + 1
    for r, row in enumerate(layer):
        assert len(row) == r + 1
        for c, coef in enumerate(row):
            i, j, k = n - r, c, r - c
            assert coef == math.factorial(n) // (math.factorial(i) * math.factorial(j) * math.factorial(k))
    assert sum(map(sum, layer)) == 3**n  # (1 + 1 + 1)^n


def test_pyramid_spec_example():
    assert pyramid_layer(4)[2] == [6, 12, 6]


def test_band_spec_values_at_full_alpha():
    bias = PascalBias(BiasConfig(pascal_n=3, window=3, theta_init=-1.5, warmup_steps=4000))
    a = bias(torch.tensor(4000))
    skip = math.exp(-math.exp(-1.5))
    assert a.dtype == torch.float32 and a.shape == (3,)
    torch.testing.assert_close(a, torch.tensor([math.log(2), math.log(4), math.log(4) * skip]))
    assert abs(skip - 0.800) < 1e-3  # the skip factor at initialisation
    torch.testing.assert_close(bias.skip_penalty(), torch.tensor([skip]))
    assert bias.theta.shape == (1,)


def test_band_generalises_with_one_skip_factor_per_skipped_token():
    bias = PascalBias(BiasConfig(pascal_n=5, window=5, theta_init=0.3, warmup_steps=0))
    s = math.exp(-math.exp(0.3))
    want = [math.log1p(math.comb(5, d)) * s ** max(d - 1, 0) for d in range(5)]
    torch.testing.assert_close(bias(torch.tensor(0)), torch.tensor(want))


@pytest.mark.parametrize("n,window", [(3, 0), (3, 5), (1, 3)])
def test_bad_window_raises(n, window):
    with pytest.raises(ValueError, match=f"window={window}"):
        band_base(n, window)
    with pytest.raises(ValueError):
        PascalBias(BiasConfig(pascal_n=n, window=window))


def test_alpha_schedule():
    T = 4000
    got = alpha(torch.tensor([0, T // 2, T, 2 * T]), T)
    torch.testing.assert_close(got, torch.tensor([0.01, 0.505, 1.0, 1.0]))
    assert alpha(torch.tensor(7), 0).item() == 1.0


def test_band_follows_step_and_is_float32_when_cast_to_bf16():
    bias = PascalBias(BiasConfig(warmup_steps=100))
    a0, a1 = bias(torch.tensor(0)), bias(torch.tensor(100))
    torch.testing.assert_close(a0, 0.01 * a1)
    bias.to(torch.bfloat16)  # what a bf16 engine does to the whole module
    assert bias(torch.tensor(100)).dtype == torch.float32
    bias.reset_buffers()
    assert bias.base.dtype == torch.float32
    torch.testing.assert_close(bias.base, torch.tensor(band_base(3, 3)))


def test_dtheta_matches_central_difference():
    """d/dtheta of a scalar of the attention output, float64, against a central finite difference."""
    torch.manual_seed(0)
    B, H, T, D = 2, 2, 9, 8
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
    w = torch.randn(B, H, T, D, dtype=torch.float64)
    bias = PascalBias(BiasConfig(warmup_steps=10, theta_init=-0.4)).double()
    step = torch.tensor(7)
    be = get_backend("reference")

    def f() -> torch.Tensor:
        return (be.attend(q, k, v, be.prepare(bias(step), T, q.device, q.dtype), 0.0) * w).sum()

    f().backward()
    g = bias.theta.grad.item()
    h = 1e-5
    with torch.no_grad():
        bias.theta += h
        fp = f().item()
        bias.theta -= 2 * h
        fm = f().item()
    fd = (fp - fm) / (2 * h)
    assert abs(g) > 1e-3
    assert abs(g - fd) <= 1e-7 * max(1.0, abs(fd))
