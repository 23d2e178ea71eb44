"""The `fused` backend (one Triton flash kernel, band and dropout inside) against a float64 dense reference.

Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 before triton is
imported). Its tl.dot is wrong for bf16 tiles, so bf16 is checked only on CUDA (the `gpu` tests at the end);
float32 and float16 run the same kernel source here.
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
if not torch.cuda.is_available() and tuple(map(int, triton.__version__.split(".")[:2])) < (3, 9):
    # older interpreters turn tensor loop bounds into Python ints in a way NumPy 2 refuses (seen with 3.5)
    if os.environ.get("CI") == "true":
        raise ImportError(f"Triton {triton.__version__}: the kernel tests need its interpreter from 3.9 on")
    pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run these kernels (3.9+ can)",
                allow_module_level=True)

from pascal_dist.attention import get_backend  # noqa: E402
from pascal_dist.bias import PascalBias  # noqa: E402
from pascal_dist.fused_attention import dropout_mask  # noqa: E402
from pascal_dist.schema import BiasConfig  # noqa: E402
from tests.test_banded_attention import (LABELS, STEP, THETA, WARMUP, batch, build, inputs,  # noqa: E402
                                         loss_and_grads, spec_band64)



@pytest.fixture(autouse=True)
def interpreter_only(request):
    """The CPU tests hand CPU tensors to the kernels: only Triton's interpreter takes those. On a GPU machine the
    `gpu`-marked tests check the compiled kernels instead."""
    if torch.cuda.is_available() and request.node.get_closest_marker("gpu") is None:
        pytest.skip("runs the kernels in Triton's CPU interpreter; on a GPU the `gpu` tests cover them")

def reference64(q, k, v, w, pascal_n, window, keep=None, p=0.0):
    """Output and grads (q, k, v, theta, band) of dense float64 attention, dropout by an explicit keep-mask."""
    q, k, v = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    theta = torch.tensor([THETA], dtype=torch.float64, requires_grad=True)
    band = spec_band64(theta, pascal_n, window)
    band.retain_grad()
    T = q.size(-2)
    dist = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    bias = torch.zeros(T, T, dtype=torch.float64).masked_fill(dist < 0, -math.inf)
    for m in range(window):
        bias = bias + torch.where(dist == m, band[m], 0.0)
    att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + bias, dim=-1)
    if keep is not None:
        att = att * keep.cpu().double() / (1 - p)
    out = att @ v
    (out * w.cpu().double()).sum().backward()
    dtheta = torch.zeros(1, dtype=torch.float64) if theta.grad is None else theta.grad
    return out.detach(), q.grad, k.grad, v.grad, dtheta, band.grad


def fused(q, k, v, w, pascal_n, window, p=0.0):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    bias = PascalBias(BiasConfig(pascal_n=pascal_n, window=window, theta_init=THETA, warmup_steps=WARMUP))
    bias = bias.to(q.device)
    band = bias(torch.tensor(STEP, device=q.device))
    band.retain_grad()
    be = get_backend("fused")
    out = be.attend(q, k, v, be.prepare(band, q.size(-2), q.device, q.dtype), p)
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad, bias.theta.grad, band.grad


def rel_err(x, ref):
    return ((x.detach().cpu().double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("pascal_n,window", [(3, 1), (3, 3), (4, 5)])  # window 5: not a power of two
@pytest.mark.parametrize("T,D", [(1, 16), (3, 16), (17, 16), (70, 40), (130, 64), (66, 128)])
def test_float32_matches_float64_reference(T, D, pascal_n, window):
    q, k, v, w = inputs(T, D, torch.float32, seed=T + D + window)
    got, ref = fused(q, k, v, w, pascal_n, window), reference64(q, k, v, w, pascal_n, window)
    for label, x, r in zip(LABELS, got, ref):
        assert x.dtype == torch.float32, label
        tol = 1e-4 * r.abs().max().item()  # band and theta grads are sums over B*H*T terms
        torch.testing.assert_close(x.double(), r, rtol=1e-4, atol=max(2e-5, tol), msg=f"T={T} D={D} {label}")


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 1e-2)])
def test_half_precision_matches_float64_reference(dtype, tol):
    if dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("Triton's interpreter multiplies bf16 tiles as raw integers in tl.dot (triton 3.9); GPU only")
    q, k, v, w = inputs(96, 64, dtype, seed=11)
    got, ref = fused(q, k, v, w, 3, 3), reference64(q, k, v, w, 3, 3)
    for label, x, r in zip(LABELS, got, ref):
        assert x.dtype == (dtype if label in ("out", "dq", "dk", "dv") else torch.float32), label
        assert rel_err(x, r) < (2 * tol if label in ("dtheta", "dband") else tol), f"{dtype} {label}"


@pytest.mark.parametrize("T,D", [(70, 16), (130, 128)])  # head dim 128: other tile sizes, the same mask
def test_dropout_is_exact_for_the_mask_it_draws(T, D):
    """Forward and every gradient equal dense float64 attention with the kernel's own keep-mask."""
    q, k, v, w = inputs(T, D, torch.float32, seed=3)
    p = 0.3
    torch.manual_seed(7)
    got = fused(q, k, v, w, 3, 3, p=p)
    torch.manual_seed(7)  # the forward drew its seed from the same generator state
    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64)
    keep = dropout_mask(seed, *q.shape[:3], p)
    assert 0.6 < keep.float().mean().item() < 0.8
    ref = reference64(q, k, v, w, 3, 3, keep=keep, p=p)
    for label, x, r in zip(LABELS, got, ref):
        tol = 1e-4 * r.abs().max().item()
        torch.testing.assert_close(x.double(), r, rtol=1e-4, atol=max(2e-5, tol), msg=label)
    no_dropout = reference64(q, k, v, w, 3, 3)[0]
    assert rel_err(got[0], no_dropout) > 0.05  # the mask did something


def test_dropout_mask_statistics_and_streams():
    seed = torch.tensor([12345], dtype=torch.int64)
    keep = dropout_mask(seed, 2, 3, 128, 0.1).float()
    assert abs(keep.mean().item() - 0.9) < 0.005  # 98k draws: 0.005 is over 5 standard deviations
    assert torch.equal(dropout_mask(seed, 2, 3, 128, 0.1).float(), keep)  # regenerated bit for bit
    heads = keep.reshape(6, -1)
    assert all(not torch.equal(heads[0], heads[i]) for i in range(1, 6))  # one stream per (batch, head)
    other = dropout_mask(seed + 1, 2, 3, 128, 0.1).float()
    assert (other != keep).float().mean().item() > 0.1


def test_model_equals_reference_backend():
    idx, tgt = batch()
    (l0, g0), (l1, g1) = (loss_and_grads(build(b).train(), idx, tgt) for b in ("reference", "fused"))
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    assert g0.keys() == g1.keys() and g1["bias.theta"].abs().item() > 0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-7, msg=name)


def with_attn_dropout(model, p):
    for block in model.blocks:
        block.attn.attn_dropout = p
    return model


def test_model_with_attention_dropout_is_reproducible():
    """A run is a pure function of the seed: the dropout seed comes from torch's generator."""
    idx, tgt = batch()
    runs = []
    for _ in range(2):
        m = with_attn_dropout(build("fused"), 0.1).train()
        torch.manual_seed(5)
        runs.append(loss_and_grads(m, idx, tgt))
    (l0, g0), (l1, g1) = runs
    assert torch.equal(l0, l1) and all(torch.equal(g0[n], g1[n]) for n in g0)
    m = with_attn_dropout(build("fused"), 0.1).train()
    torch.manual_seed(6)
    assert not torch.equal(loss_and_grads(m, idx, tgt)[0], l0)


def test_compiled_activation_checkpointing_keeps_the_dropout_mask():
    """Recomputing a checkpointed block must not draw a new dropout seed: compiled gradients equal eager ones."""
    idx, tgt = batch()
    grads = []
    for compiled in (False, True):
        torch.manual_seed(0)
        cfg_model = with_attn_dropout(build("fused", activation_checkpointing=True), 0.3).train()
        fwd = torch.compile(cfg_model, backend="aot_eager_decomp_partition") if compiled else None
        torch.manual_seed(9)
        grads.append(loss_and_grads(cfg_model, idx, tgt, fwd))
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


def test_compiles_without_graph_breaks_and_matches_eager():
    m = build("fused").train()
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


def test_without_a_gpu_training_refuses_and_everything_else_runs_banded(monkeypatch, tiny_data, tmp_path):
    """Training must not silently swap kernels; evaluation, export and generation of a model trained with
    `fused` elsewhere run the same function with `banded`."""
    import subprocess
    import sys

    from safetensors.torch import save_model

    from pascal_dist.attention import runnable_backend
    from pascal_dist.config import to_yaml
    from pascal_dist.export import load_exported
    from pascal_dist.model import PascalGPT
    from pascal_dist.schema import ModelConfig, RunConfig
    from tests.helpers import REPO

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: nothing is missing")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert (runnable_backend("fused"), runnable_backend("sdpa")) == ("banded", "sdpa")
    proc = subprocess.run([sys.executable, "launcher/train.py", "model.attention.backend=fused",
                           f"train.run_dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: model.attention.backend 'fused' needs a CUDA GPU (or TRITON_INTERPRET=1: Triton's CPU interpreter, "
        "for tests only, very slow); 'banded' computes the same function anywhere")

    cfg = RunConfig(model=ModelConfig(vocab_size=512, block_size=32, n_layer=1, n_head=2, n_embd=16))
    cfg.data.dir = tiny_data
    torch.manual_seed(1)
    sdpa = PascalGPT(cfg.model).eval()
    cfg.model.attention.backend = "fused"
    out = tmp_path / "export"
    out.mkdir()
    save_model(sdpa, str(out / "model.safetensors"))
    (out / "config.yaml").write_text(to_yaml(cfg))
    (out / "tokenizer.json").write_bytes(open(os.path.join(tiny_data, "tokenizer.json"), "rb").read())
    model, loaded_cfg, _ = load_exported(str(out))
    assert model.backend.name == "banded" and loaded_cfg.model.attention.backend == "banded"
    idx = torch.randint(0, 512, (2, 20))
    torch.testing.assert_close(model(idx)[0], sdpa(idx)[0], rtol=1e-5, atol=1e-5)


# --- on a GPU: the compiled kernels, bf16, long sequences, head dims 64 and 128 ---------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T,D,p,dtype", [(256, 64, 0.0, torch.bfloat16), (1000, 64, 0.0, torch.bfloat16),
                                         (1024, 128, 0.0, torch.bfloat16), (4096, 64, 0.0, torch.bfloat16),
                                         (256, 64, 0.1, torch.bfloat16), (1000, 128, 0.1, torch.bfloat16),
                                         (256, 64, 0.1, torch.float16), (300, 64, 0.1, torch.float32)])
def test_cuda_matches_float64_reference(T, D, p, dtype):
    q, k, v, w = inputs(T, D, torch.float32, seed=T + D, B=1, H=2)
    q, k, v, w = (t.cuda().to(dtype) for t in (q, k, v, w))
    torch.manual_seed(1)
    got = fused(q, k, v, w, 3, 3, p=p)
    keep = None
    if p:
        torch.manual_seed(1)
        keep = dropout_mask(torch.randint(0, 2 ** 62, (1,), device="cuda", dtype=torch.int64), 1, 2, T, p)
    ref = reference64(q.float(), k.float(), v.float(), w.float(), 3, 3, keep=keep, p=p)
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}[dtype]  # float32: IEEE matmuls
    for label, x, r in zip(LABELS, got, ref):
        err = rel_err(x, r)
        assert err < (2 * tol if label in ("dtheta", "dband") else tol), f"T={T} D={D} p={p} {dtype} {label}: {err}"


# --- under the real engine: 2 ranks, ZeRO-2, float32 (the interpreter's bf16 matmul is wrong, see above) -------

@pytest.mark.slow
def test_trains_under_deepspeed_like_the_reference_backend(tiny_data, tmp_path):
    """The same 2-rank run with `reference` and with `fused`: every step's loss agrees (float32, dropout 0)."""
    import json

    from tests.helpers import TINY, run_train

    ds = json.load(open("configs/zero2.json"))
    ds["bf16"] = {"enabled": False}
    (tmp_path / "fp32.json").write_text(json.dumps(ds))
    losses = {}
    for backend in ("reference", "fused"):
        run_dir = tmp_path / backend
        proc = run_train(str(tmp_path / "fp32.json"), TINY + [f"data.dir={tiny_data}", f"train.run_dir={run_dir}",
                                                              "train.max_steps=6", f"model.attention.backend={backend}"])
        assert proc.returncode == 0, proc.stdout[-3000:]
        with open(run_dir / "rank_sync.jsonl") as f:
            losses[backend] = [json.loads(line)["loss"] for line in f]
    assert len(losses["fused"]) == 6
    assert losses["fused"] == pytest.approx(losses["reference"], rel=1e-5)
