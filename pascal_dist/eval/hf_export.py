"""Export for Hugging Face transformers: a checkpoint or exported model -> a directory that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` and `AutoTokenizer.from_pretrained(dir)` load.

The directory holds config.json (with auto_map), the standalone modeling code (pascal_dist/eval/hf_modeling, copied:
it imports only torch and transformers), model.safetensors, the tokenizer as a fast tokenizer ([EOS] is eos and pad),
generation_config.json and a model card (README.md). The weights keep PascalGPT's parameter names and the directory
also keeps config.yaml and export.json, so it is at the same time a pascal-dist export: `pascal-dist evaluate`,
`generate` and `lm-eval` read it as they read a safetensors export.

alpha is fixed at the checkpoint's step (config.json's pascal_alpha); theta stays a parameter, so fine-tuning the
export with transformers keeps learning the skip factor as training did, while the warm-up is over for good.
transformers is imported inside functions: importing this module does not need it.
"""

from __future__ import annotations

import json
import math
import os
import shutil

from pascal_dist.config import RunConfig
from pascal_dist.eval.export import CONFIG, META, TOKENIZER, WEIGHTS, ExportError, export_checkpoint, load_exported
from pascal_dist.model import PascalGPT, alpha

MODELING_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_modeling")
MODELING_FILES = ("configuration_pascal.py", "modeling_pascal.py")
AUTO_MAP = {
    "AutoConfig": "configuration_pascal.PascalConfig",
    "AutoModelForCausalLM": "modeling_pascal.PascalForCausalLM",
}
EOS = "[EOS]"


def require_transformers() -> None:
    """Refuse with one line, rather than a traceback, where the [hf] extra is not installed."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ExportError("--format hf needs transformers: pip install 'pascal-dist[hf]'") from None


def bias_kind(model: PascalGPT, cfg: RunConfig) -> str:
    """'pascal', 'learned' or 'none' (the unbiased backend owns no bias module)."""
    return "none" if model.bias is None else cfg.model.bias.kind


def hf_config(model: PascalGPT, cfg: RunConfig, eos_id: int):
    """The PascalConfig of `model` as it runs now: alpha at its bias_step, its shape, [EOS] as eos and pad."""
    from pascal_dist.eval.hf_modeling.configuration_pascal import PascalConfig

    m, b = cfg.model, cfg.model.bias
    kind = bias_kind(model, cfg)
    # the value the model's own forward uses at this step: float32, stored exactly as a JSON double
    strength = float(alpha(model.bias_step, b.warmup_steps)) if kind == "pascal" else 1.0
    return PascalConfig(
        vocab_size=m.vocab_size,
        block_size=m.block_size,
        n_layer=m.n_layer,
        n_head=m.n_head,
        n_embd=m.n_embd,
        dropout=m.dropout,
        attn_dropout=m.attn_dropout,
        bias_kind=kind,
        pascal_n=b.pascal_n,
        pascal_window=b.window,
        pascal_alpha=strength,
        theta_init=b.theta_init,
        # provenance only: the model does not read them
        pascal_step=int(model.bias_step),
        pascal_warmup_steps=b.warmup_steps,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        architectures=["PascalForCausalLM"],
        auto_map=dict(AUTO_MAP),
    )


def to_hf(model: PascalGPT, cfg: RunConfig, eos_id: int):
    """A PascalForCausalLM holding `model`'s weights (float32), in eval mode."""
    from pascal_dist.eval.hf_modeling.modeling_pascal import PascalForCausalLM

    hf = PascalForCausalLM(hf_config(model, cfg, eos_id))
    state = {k: v.float() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to wte.weight
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ExportError(f"weights do not match the transformers model (missing {missing}, unexpected {unexpected})")
    if hf.lm_head.weight.data_ptr() != hf.wte.weight.data_ptr():
        hf.lm_head.weight = hf.wte.weight
    return hf.eval()


def training_tokens(meta: dict, cfg: RunConfig) -> int | None:
    """Tokens trained on: optimizer updates x global batch; None when the checkpoint's world size is unknown."""
    from pascal_dist.train.checkpoint import read_meta

    source = meta.get("checkpoint")
    if not source or not os.path.isdir(source):
        return None
    ckpt_meta = read_meta(os.path.dirname(source), os.path.basename(source))
    if not ckpt_meta or "world_size" not in ckpt_meta:
        return None
    t = cfg.train
    return int(meta["step"]) * t.micro_batch_size * t.grad_accum * ckpt_meta["world_size"] * cfg.model.block_size


def model_card(model: PascalGPT, cfg: RunConfig, meta: dict, tokens: int | None) -> str:
    """README.md of the export: what the model is, how it was trained, how to load it."""
    m, b, t = cfg.model, cfg.model.bias, cfg.train
    kind, step = bias_kind(model, cfg), int(meta.get("step", 0))
    if kind == "pascal":
        theta = float(model.bias.theta.detach().float()[0])
        a = float(alpha(model.bias_step, b.warmup_steps))
        bias = (
            f"the Pascal band from layer n = {b.pascal_n} of Pascal's pyramid on {b.window} diagonals, "
            f"a_d = alpha * log(1 + C(n, d)) * s^max(d-1, 0), s = exp(-exp(theta)). alpha = {a:.6g} "
            f"(the warm-up 0.01 + 0.99 min(t / {b.warmup_steps}, 1) at t = {step}, fixed in config.json as "
            f"pascal_alpha); theta = {theta:.6g} (s = {math.exp(-math.exp(theta)):.6g}), a trainable parameter"
        )
    elif kind == "learned":
        values = ", ".join(f"{v:.4g}" for v in model.bias.band.detach().float().tolist())
        bias = f"a learned band of {b.window} free values ({values}), no pyramid and no warm-up"
    else:
        bias = "none: plain causal attention (the ablation's unbiased baseline)"
    trained = (
        f"{tokens:,} tokens" if tokens is not None else "tokens not recorded (the checkpoint's world size is gone)"
    )
    return f"""---
library_name: transformers
tags: [pascal-dist, custom_code, text-generation]
---

# Pascal-biased decoder (pascal-dist export, step {step})

A GPT-2-shaped decoder whose attention adds a bias on the diagonals nearest the main one:
softmax(QK^T / sqrt(d_head) + B + causal) V with B[i, j] = a_(i-j) for 0 <= i - j < window, one band shared by every
head and layer. Bias here: {bias}.

| | |
|---|---|
| layers, heads, width | {m.n_layer}, {m.n_head}, {m.n_embd} |
| context (learned absolute positions) | {m.block_size} tokens |
| vocabulary | {m.vocab_size} (BPE, Whitespace pre-tokenizer; `[EOS]` ends a document) |
| parameters | {model.num_params():,} |
| trained | {step} optimizer steps, {trained} |
| batch per step | {t.micro_batch_size} x {t.grad_accum} accumulation x world size, {m.block_size} tokens each |
| optimizer | AdamW, lr {t.lr:g}, warm-up {t.warmup_steps} steps, cosine to {t.min_lr_ratio:g} x lr at {t.decay_steps} |
| weight decay | {t.weight_decay:g} |
| dropout (embeddings/residual, attention) | {m.dropout:g}, {m.attn_dropout:g} |
| data | `{cfg.data.dir}` |
| source checkpoint | `{meta.get("checkpoint", "unknown")}` |

The full training config is `config.yaml`. Trained with pascal-dist (DeepSpeed ZeRO); exported with
`pascal-dist export CHECKPOINT OUT --format hf`.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("OUT", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("OUT")
ids = tokenizer("The king said", return_tensors="pt")
print(tokenizer.decode(model.generate(**ids, max_new_tokens=20, do_sample=False)[0]))
```

`trust_remote_code=True` runs `modeling_pascal.py` and `configuration_pascal.py` from this directory; they import
only torch and transformers. The tokenizer needs no code, but in an interactive session `AutoTokenizer` first asks
whether to run the directory's configuration code; `trust_remote_code=True` there too skips the question. Prompt
plus new tokens must stay within {m.block_size} tokens (learned positions). In fp32 the logits equal pascal-dist's
own model's to 1e-5, with or without the KV cache. lm-evaluation-harness:
`lm_eval --model hf --model_args pretrained=OUT,trust_remote_code=True,backend=causal --tasks lambada_openai`.

The decoded text shows the tokenizer's limit: the Whitespace pre-tokenizer forgets where words were split, so word
pieces decode space-separated.
"""


def export_hf(source: str, out_dir: str) -> str:
    """Write the transformers export of `source` (a run dir, checkpoints dir, checkpoint tag dir, or an exported model
    dir) into the new directory `out_dir`; refuses a non-empty `out_dir`. Returns out_dir."""
    require_transformers()
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ExportError(f"output directory '{out_dir}' is not empty; choose a new one")
    tmp = out_dir.rstrip("/") + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if os.path.isfile(os.path.join(source, WEIGHTS)):  # already exported: start from its files
            os.makedirs(tmp)
            for name in (WEIGHTS, CONFIG, TOKENIZER, META):
                if os.path.isfile(os.path.join(source, name)):
                    shutil.copyfile(os.path.join(source, name), os.path.join(tmp, name))
        elif os.path.isdir(source):
            export_checkpoint(source, tmp)
        else:
            raise ExportError(f"'{source}': no such directory (expected a checkpoint or an exported model)")
        write_hf(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def write_hf(path: str) -> None:
    """Add the transformers files to the exported model directory `path` (its weights are rewritten in the same
    names, so pascal-dist still loads them)."""
    from transformers import PreTrainedTokenizerFast

    model, cfg, tokenizer = load_exported(path)
    eos_id = tokenizer.token_to_id(EOS)
    if eos_id is None:
        raise ExportError(f"'{os.path.join(path, TOKENIZER)}' has no {EOS} token")
    meta = {"step": int(model.bias_step)}
    if os.path.isfile(os.path.join(path, META)):
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)

    hf = to_hf(model, cfg, eos_id)
    hf.generation_config.eos_token_id = eos_id
    hf.generation_config.pad_token_id = eos_id
    hf.save_pretrained(path)
    for name in MODELING_FILES:
        shutil.copyfile(os.path.join(MODELING_DIR, name), os.path.join(path, name))

    with open(os.path.join(path, TOKENIZER), "rb") as f:
        trained_tokenizer = f.read()
    fast = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(path, TOKENIZER),
        eos_token=EOS,
        pad_token=EOS,
        unk_token="[UNK]",
        model_max_length=cfg.model.block_size,
        clean_up_tokenization_spaces=False,  # decode exactly as the tokenizers library does
    )
    fast.save_pretrained(path)
    # transformers re-serialises tokenizer.json; the trained file stays byte for byte (runs check its sha256)
    with open(os.path.join(path, TOKENIZER), "wb") as f:
        f.write(trained_tokenizer)
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write(model_card(model, cfg, meta, training_tokens(meta, cfg)))
