"""The engine: the reference recipe learning-rate schedule in optimizer steps, and compiling (scopes, memory budget)."""

import math
import os

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from pascal_dist.config.schema import TrainConfig
from pascal_dist.train.engine import compile_engine, compile_model, lr_lambda
from tests.helpers import REPO
from tests.unit.attention.test_banded import batch, build, loss_and_grads


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
        compile_engine(Engine(), 0.9, scope="model")
    assert seen == [0.9]
    assert functorch_config.activation_memory_budget == 1.0


def test_compile_engine_scopes(monkeypatch):
    """'model' goes through DeepSpeed's engine.compile(); 'blocks' compiles the regions of the engine's module and
    leaves the module itself uncompiled, and turns DeepSpeed's NVTX ranges off as engine.compile() does (each one
    would break a compiled graph)."""
    import deepspeed.utils.nvtx

    monkeypatch.setattr(deepspeed.utils.nvtx, "enable_nvtx", True)

    class Engine:
        def __init__(self):
            self.module, self.compiled = build("banded"), False

        def compile(self):
            self.compiled = True

    whole, regional = Engine(), Engine()
    compile_engine(whole, scope="model")
    compile_engine(regional)  # train.compile_scope's default
    assert whole.compiled and not regional.compiled
    compiled = {name for name, m in regional.module.named_modules() if m._compiled_call_impl is not None}
    assert compiled == {"blocks.0", "blocks.1", "lm_head"}
    assert deepspeed.utils.nvtx.enable_nvtx is False
    with pytest.raises(ValueError, match="compile scope must be 'blocks' or 'model', got 'layers'"):
        compile_model(build("banded"), "layers")


@pytest.mark.parametrize("n_layer", [1, 3])
def test_compiled_blocks_share_one_graph_and_match_eager(n_layer):
    """Regional compilation: every block runs the one graph compiled for the first (one frame for the blocks, one for
    the loss head, whatever the depth), with no graph break, and the loss and every gradient (theta too, whose band
    enters each block from outside) equal eager's."""
    torch._dynamo.reset()  # what earlier tests compiled of the same code must not count here
    eager, regional = build("banded", n_layer=n_layer).train(), build("banded", n_layer=n_layer).train()
    idx, tgt = batch()
    l0, g0 = loss_and_grads(eager, idx, tgt)
    cnt = CompileCounterWithBackend("aot_eager")
    compile_model(regional, "blocks", backend=cnt, fullgraph=True)
    for _ in range(2):  # the second call recompiles nothing
        regional.zero_grad(set_to_none=True)
        l1, g1 = loss_and_grads(regional, idx, tgt)
    assert cnt.frame_count == 2
    torch.testing.assert_close(l1, l0)
    assert g1["bias.theta"].abs().item() > 0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scope", ["blocks", "model"])
@pytest.mark.parametrize("backend", ["fused", "banded", "sdpa", "none"])
def test_cuda_bf16_compiled_matches_eager(backend, scope):
    """Inductor's CUDA code for each scope against eager, in bf16. torch 2.11 once compiled a zero attention gradient
    on CPU (pytorch/pytorch#180642, worked around); a miscompile of that kind is a gradient off by its own size."""
    torch._dynamo.reset()
    idx, tgt = (t.cuda() for t in batch(B=4, T=32))
    eager, compiled = (build(backend).cuda().train() for _ in range(2))
    compile_model(compiled, scope)
    results = []
    for m in (eager, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = m(idx, tgt)
        loss.backward()
        results.append((loss.float(), {n: p.grad.float() for n, p in m.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert abs(l1 - l0).item() < 1e-2
    for name in g0:
        rel = ((g1[name] - g0[name]).norm() / g0[name].norm().clamp_min(1e-12)).item()
        assert rel < 5e-2, (name, rel)


def test_deepspeed_outside_the_required_range_is_refused(monkeypatch):
    """Older DeepSpeed releases apply a bf16 step whose gradient is NaN; pyproject and the run both refuse them."""
    import deepspeed

    from pascal_dist.config import ConfigError
    from pascal_dist.train.engine import DEEPSPEED_REQUIRED, require_deepspeed

    with open(os.path.join(REPO, "pyproject.toml")) as f:
        assert f'"deepspeed{DEEPSPEED_REQUIRED}"' in f.read()
    for version in ("0.16.0", "0.19.7", "0.20.0"):
        monkeypatch.setattr(deepspeed, "__version__", version)
        with pytest.raises(ConfigError, match=f"DeepSpeed {version} is installed; pascal-dist needs deepspeed>=0.19.8"):
            require_deepspeed()
    monkeypatch.setattr(deepspeed, "__version__", "0.19.8")
    require_deepspeed()


def test_the_step_patches_apply_only_to_tested_deepspeed(monkeypatch):
    import deepspeed

    from pascal_dist.train import zero_step

    monkeypatch.setattr(deepspeed, "__version__", zero_step.TESTED_DEEPSPEED[-1])
    assert zero_step.untested_deepspeed() is None
    monkeypatch.setattr(deepspeed, "__version__", "0.19.9")  # within the requirement, but nobody tested it
    assert "DeepSpeed 0.19.9: its own ZeRO step runs" in zero_step.untested_deepspeed()
    assert not zero_step._checked_deepspeed()
