"""The `fused` backend (one Triton flash kernel, band and dropout inside) against a float64 dense reference.

Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 before triton is
imported). Its tl.dot is wrong for bf16 tiles, so bf16 is checked only on CUDA (the `gpu` tests at the end);
float32 and float16 run the same kernel source here.
"""

import os

import pytest
import torch

from tests.helpers import FUSED_INTERPRETER_FROM, require_triton

require_triton(interpreter_from=FUSED_INTERPRETER_FROM)
from pascal_dist.attention.fused import dropout_mask  # noqa: E402
from pascal_dist.train.engine import compile_model  # noqa: E402
from tests.unit.attention.test_banded import (  # noqa: E402
    LABELS,
    assert_compiles_like_eager,
    assert_float32_close,
    batch,
    build,
    inputs,
    loss_and_grads,
    ref64,
    rel_err,
    run_backend,
)

pytestmark = pytest.mark.usefixtures("kernels_take_cpu_tensors")


def fused(q, k, v, w, pascal_n, window, p=0.0):
    return run_backend("fused", q, k, v, w, pascal_n, window, p)


@pytest.mark.parametrize("pascal_n,window", [(3, 1), (3, 3), (4, 5)])  # window 5: not a power of two
@pytest.mark.parametrize("T,D", [(1, 16), (3, 16), (17, 16), (70, 40), (130, 64), (66, 128)])
def test_float32_matches_float64_reference(T, D, pascal_n, window):
    q, k, v, w = inputs(T, D, torch.float32, seed=T + D + window)
    got, ref = fused(q, k, v, w, pascal_n, window), ref64(q, k, v, w, pascal_n, window)
    assert all(x.dtype == torch.float32 for x in got)
    assert_float32_close(got, ref, f"T={T} D={D}")


# Triton's interpreter multiplies bf16 tiles as raw integers in tl.dot (triton 3.9): bf16 is a `gpu` case, which
# bench/gpu.sh's test stage runs.
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float16, 5e-3), pytest.param(torch.bfloat16, 1e-2, marks=pytest.mark.gpu)]
)
def test_half_precision_matches_float64_reference(dtype, tol):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter's tensors live on the CPU
    q, k, v, w = (t.to(device) for t in inputs(96, 64, dtype, seed=11))
    got, ref = fused(q, k, v, w, 3, 3), ref64(q, k, v, w, 3, 3)
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
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    keep = dropout_mask(seed, *q.shape[:3], p)
    assert 0.6 < keep.float().mean().item() < 0.8
    ref = ref64(q, k, v, w, 3, 3, keep=keep, p=p)
    assert_float32_close(got, ref)
    no_dropout = ref64(q, k, v, w, 3, 3)[0]
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


def test_output_is_laid_out_for_the_output_projection():
    """The output's memory is (B, T, H, d), so the model's transpose back to (B, T, C) copies nothing; the
    compiler's fake output has the same strides (else a compiled graph would read it wrongly)."""
    from pascal_dist.attention.fused import fused_forward

    q, k, v = (torch.randn(2, 3, 20, 16) for _ in range(3))
    a = torch.tensor([0.7, 1.4, 0.2])
    out = fused_forward(q, k, v, a, 0.0)[0]
    assert out.shape == (2, 3, 20, 16) and out.transpose(1, 2).is_contiguous()
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = fused_forward(*(mode.from_tensor(t) for t in (q, k, v, a)), 0.0)[0]
    assert fake.stride() == out.stride()


def with_attn_dropout(model, p):
    for block in model.blocks:
        block.attn.attn_dropout = p
    return model


def test_every_launch_states_fp_fusion():
    """As the band kernels (test_band_kernels): FP fusion on whatever Triton's default, tiles of every dtype."""
    from pascal_dist.attention import fused as fa

    for kernel in ("fwd", "dq", "dkdv", "delta"):
        for head_dim in (64, 128):
            for dtype in (torch.bfloat16, torch.float32):
                assert fa.tiles(head_dim, kernel, dtype)["enable_fp_fusion"] is True, (kernel, head_dim, dtype)


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


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compiled_activation_checkpointing_keeps_the_dropout_mask(scope):
    """Recomputing a checkpointed block must not draw a new dropout seed: compiled gradients equal eager ones,
    whether the checkpoint wraps a compiled block or sits inside the compiled model."""
    idx, tgt = batch()
    grads = []
    for compiled in (False, True):
        torch.manual_seed(0)
        cfg_model = with_attn_dropout(build("fused", activation_checkpointing=True), 0.3).train()
        if compiled:
            compile_model(cfg_model, scope, backend="aot_eager_decomp_partition")
        torch.manual_seed(9)
        grads.append(loss_and_grads(cfg_model, idx, tgt))
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


def test_compiles_without_graph_breaks_and_matches_eager():
    assert_compiles_like_eager(build("fused").train())


def test_without_a_gpu_training_refuses_and_everything_else_runs_banded(monkeypatch, tiny_data, tmp_path):
    """Training must not silently swap kernels; evaluation, export and generation of a model trained with
    `fused` elsewhere run the same function with `banded`."""
    import subprocess
    import sys

    from safetensors.torch import save_model

    from pascal_dist.attention import runnable_backend
    from pascal_dist.config import to_yaml
    from pascal_dist.config.schema import ModelConfig, RunConfig
    from pascal_dist.eval.export import load_exported
    from pascal_dist.model import PascalGPT
    from tests.helpers import REPO

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: nothing is missing")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert (runnable_backend("fused"), runnable_backend("sdpa")) == ("banded", "sdpa")
    proc = subprocess.run(
        [sys.executable, "launcher/train.py", "model.attention.backend=fused", f"train.run_dir={tmp_path / 'run'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: model.attention.backend 'fused' needs a CUDA GPU (or TRITON_INTERPRET=1: Triton's CPU interpreter, "
        "for tests only, very slow); 'banded' computes the same function anywhere"
    )

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
@pytest.mark.parametrize(
    "T,D,p,dtype",
    [
        (256, 64, 0.0, torch.bfloat16),
        (1000, 64, 0.0, torch.bfloat16),
        (1024, 128, 0.0, torch.bfloat16),
        (4096, 64, 0.0, torch.bfloat16),
        (256, 64, 0.1, torch.bfloat16),
        (1000, 128, 0.1, torch.bfloat16),
        (256, 64, 0.1, torch.float16),
        (300, 64, 0.1, torch.float32),
    ],
)
def test_cuda_matches_float64_reference(T, D, p, dtype):
    q, k, v, w = inputs(T, D, torch.float32, seed=T + D, B=1, H=2)
    q, k, v, w = (t.cuda().to(dtype) for t in (q, k, v, w))
    torch.manual_seed(1)
    got = fused(q, k, v, w, 3, 3, p=p)
    keep = None
    if p:
        torch.manual_seed(1)
        keep = dropout_mask(torch.randint(0, 2**62, (1,), device="cuda", dtype=torch.int64), 1, 2, T, p)
    ref = ref64(q.float(), k.float(), v.float(), w.float(), 3, 3, keep=keep, p=p)
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
        proc = run_train(
            str(tmp_path / "fp32.json"),
            TINY
            + [
                f"data.dir={tiny_data}",
                f"train.run_dir={run_dir}",
                "train.max_steps=6",
                f"model.attention.backend={backend}",
            ],
        )
        assert proc.returncode == 0, proc.stdout[-3000:]
        with open(run_dir / "rank_sync.jsonl") as f:
            losses[backend] = [json.loads(line)["loss"] for line in f]
    assert len(losses["fused"]) == 6
    assert losses["fused"] == pytest.approx(losses["reference"], rel=1e-5)
