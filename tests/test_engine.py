"""The engine: the SPEC learning-rate schedule in optimizer steps, and compiling with a memory budget."""
import math

import pytest

from pascal_dist.engine import compile_engine, lr_lambda
from pascal_dist.schema import TrainConfig


def test_spec_schedule_shape():
    f = lr_lambda(TrainConfig())  # warm-up 2000, cosine to 8000, floor 0.1
    assert f(0) == pytest.approx(1 / 2000)
    assert f(999) == pytest.approx(1000 / 2000)
    assert f(2000) == pytest.approx(1.0)
    assert f(5000) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(8000) == pytest.approx(0.1)
    assert f(19999) == pytest.approx(0.1)
    values = [f(s) for s in range(2000, 8001)]
    assert all(a >= b for a, b in zip(values, values[1:])), "cosine part must not increase"


def test_compile_engine_sets_the_memory_budget_before_compiling():
    import torch._functorch.config as functorch_config

    seen = []

    class Engine:
        def compile(self):
            seen.append(functorch_config.activation_memory_budget)

    # torch's own patch restores the global (pytest's monkeypatch deletes a torch config entry in torch 2.11)
    with functorch_config.patch(activation_memory_budget=1.0):
        compile_engine(Engine(), 0.9)
    assert seen == [0.9]
    assert functorch_config.activation_memory_budget == 1.0
