"""The decoder: shapes, init, tying, bias plumbing, compile-friendliness, checkpointing, groups."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter

from pascal_dist.config.schema import AttentionConfig, BiasConfig, ModelConfig
from pascal_dist.model import PascalGPT
from tests.helpers import REPO

ALL = ["reference", "sdpa", "none"]
PASCAL = ["reference", "sdpa"]
VOCAB = 97


def tiny(backend: str = "sdpa", **kw) -> ModelConfig:
    fields = dict(
        vocab_size=VOCAB,
        block_size=32,
        n_layer=2,
        n_head=2,
        n_embd=32,
        attention=AttentionConfig(backend=backend),
        bias=BiasConfig(warmup_steps=100),
    )
    fields.update(kw)
    return ModelConfig(**fields)


def build(backend: str = "sdpa", seed: int = 0, **kw) -> PascalGPT:
    torch.manual_seed(seed)
    return PascalGPT(tiny(backend, **kw))


def batch(B: int = 3, T: int = 20, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T), generator=g), torch.randint(0, VOCAB, (B, T), generator=g)


@pytest.mark.parametrize("backend", ALL)
def test_shapes_and_initial_loss(backend):
    m = build(backend).eval()
    idx, tgt = batch()
    none, loss = m(idx, tgt)
    assert none is None and loss.shape == () and loss.dtype == torch.float32  # training never builds the logits
    assert abs(loss.item() - math.log(VOCAB)) < 0.1  # near-uniform prediction at init
    logits, loss = m(idx)
    assert logits.shape == (3, 20, VOCAB) and loss is None
    ref = F.cross_entropy(logits.double().view(-1, VOCAB), tgt.view(-1))
    torch.testing.assert_close(m(idx, tgt)[1].double(), ref)  # the chunked loss is the loss of these logits
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_chunked_loss_gradients_are_those_of_the_logits():
    """Every parameter's gradient through the model's chunked loss equals the one through its full logits and
    F.cross_entropy, in float64 (dropout off: the two forwards must be the same function)."""
    m = build("sdpa", dropout=0.0, attn_dropout=0.0).double()
    m.set_bias_step(60)
    idx, tgt = batch()
    grads = []
    for loss_of in (lambda: m(idx, tgt)[1], lambda: F.cross_entropy(m(idx)[0].view(-1, VOCAB), tgt.view(-1))):
        m.zero_grad()
        loss = loss_of()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (l0, g0), (l1, g1) = grads
    assert l0.dtype == torch.float64
    torch.testing.assert_close(l0, l1, rtol=1e-12, atol=0)
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-9, atol=1e-12)


def test_tied_head_and_counts():
    m = build("sdpa")
    assert m.lm_head.weight is m.wte.weight
    n = sum(p.numel() for p in m.parameters())
    assert m.num_params() == n
    assert m.num_params(non_embedding=True) == n - 32 * 32
    assert m.flops_per_token() == 6 * (n - 32 * 32) + 12 * 2 * 32 * 32
    assert build("none").num_params() == n - 1  # the baseline has no theta


def test_spec_size():
    with torch.device("meta"):
        m = PascalGPT(ModelConfig())
    assert 91e6 < m.num_params() < 92.5e6  # the reference model: about 92M parameters at vocab 8192
    assert len(m.blocks) == 12 and m.blocks[0].mlp.c_fc.out_features == 3072
    assert not any(mod.bias is not None for mod in m.modules() if isinstance(mod, torch.nn.Linear))


def test_init_std():
    m = build("sdpa", n_embd=64, n_layer=4)
    assert abs(m.wte.weight.std().item() - 0.02) < 2e-3
    assert abs(m.blocks[0].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(8)) < 1e-3


@pytest.mark.parametrize("backend", PASCAL)
def test_zero_band_equals_unbiased_baseline(backend):
    base, biased = build("none"), build(backend)
    missing, unexpected = biased.load_state_dict(base.state_dict(), strict=False)
    assert missing == ["bias.theta"] and unexpected == []
    biased.bias.base.zero_()
    base.eval(), biased.eval()
    idx, tgt = batch()
    for step in (0, 100):  # alpha no longer matters
        biased.set_bias_step(step)
        torch.testing.assert_close(biased(idx, tgt)[0], base(idx, tgt)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ALL)
def test_bias_step_moves_output_only_with_pascal_bias(backend):
    m = build(backend).eval()
    idx, _ = batch()
    buf = m.bias_step
    y0 = m(idx)[0]
    m.set_bias_step(100)
    assert m.bias_step is buf and m.bias_step.item() == 100  # written in place
    y1 = m(idx)[0]
    assert torch.allclose(y0, y1) == (backend == "none")


@pytest.mark.parametrize("backend", PASCAL)
def test_set_bias_step_does_not_recompile(backend):
    m = build(backend).eval()
    idx, _ = batch()
    cnt = CompileCounter()
    compiled = torch.compile(m, backend=cnt)
    y0 = compiled(idx)[0]
    m.set_bias_step(60)
    y1 = compiled(idx)[0]
    m.set_bias_step(100)
    compiled(idx)
    assert cnt.frame_count == 1
    assert not torch.allclose(y0, y1)  # the compiled graph reads the new value
    torch.testing.assert_close(y1, (m.set_bias_step(60), m(idx)[0])[1])


@pytest.mark.parametrize("backend", ALL)
def test_no_graph_breaks(backend):
    m = build(backend).train()
    idx, tgt = batch()
    explanation = torch._dynamo.explain(m)(idx, tgt)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("backend", ALL)
def test_activation_checkpointing_is_transparent(backend):
    idx, tgt = batch()
    results = []
    for ckpt in (False, True):
        m = build(backend, activation_checkpointing=ckpt).train()  # dropout on: RNG must be replayed
        m.set_bias_step(50)
        torch.manual_seed(123)
        _, loss = m(idx, tgt)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("backend", ALL)
def test_param_groups(backend):
    m = build(backend)
    decay, no_decay = m.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in m.parameters()}
    assert {id(m.wte.weight), id(m.wpe.weight), id(m.blocks[0].attn.c_attn.weight)} <= {id(p) for p in decay["params"]}
    assert id(m.ln_f.weight) in {id(p) for p in no_decay["params"]}
    if m.bias is not None:
        assert id(m.bias.theta) in {id(p) for p in no_decay["params"]}


@pytest.mark.parametrize("backend", ALL)
def test_cpu_autocast_bf16(backend):
    m = build(backend).train()
    idx, tgt = batch()
    m.set_bias_step(100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = m(idx)[0], m(idx, tgt)[1]
    loss.backward()
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    if m.bias is not None:
        assert m.bias.theta.grad is not None and torch.isfinite(m.bias.theta.grad).all()


def test_theta_learns_through_the_model():
    m = build("sdpa", dropout=0.0, attn_dropout=0.0)
    m.set_bias_step(100)
    idx, tgt = batch()
    m(idx, tgt)[1].backward()
    assert m.bias.theta.grad.abs().item() > 0


def test_model_imports_without_deepspeed():
    code = "import sys; sys.modules['deepspeed'] = None; import pascal_dist.model; print('ok')"
    root = REPO
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(root), "PATH": ""},
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_backends_agree():
    idx, tgt = (t.cuda() for t in batch(B=4, T=32))
    out = {}
    for backend in PASCAL:
        m = build(backend, dropout=0.0, attn_dropout=0.0).cuda().train()
        m.set_bias_step(100)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, loss = m(idx)[0], m(idx, tgt)[1]
        loss.backward()
        out[backend] = (logits.float(), m.bias.theta.grad.clone())
    torch.testing.assert_close(out["sdpa"][0], out["reference"][0], rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(out["sdpa"][1], out["reference"][1], rtol=5e-2, atol=1e-6)
