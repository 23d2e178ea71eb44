"""What the transformers-export and lm-eval tests share: tiny models exported both ways, local lm-eval tasks built from
the embedded corpus (nothing comes from the hub), and switching the hub clients offline.

The models are random PascalGPTs drawn wider than the training init (std 0.1 instead of 0.02), so that the attention
scores, the band's effect on them and the gaps between the top logits are large: a wrong band changes the logits by
far more than the 1e-5 the comparisons allow, and no greedy choice hangs on a rounding difference.

Four tasks, each a YAML whose dataset is a local jsonl (`dataset_path: json`, `dataset_kwargs: {data_files: ...}`),
written into one directory for `--include_path`:

- `pascal_lambada`: LAMBADA-style passages, scored as lm-eval's lambada_openai scores them (context = all words but
  the last, target = " " + the last word, metric `acc` = greedy over every target token). Some passages end with a
  word the model itself predicts greedily (one or two tokens), so that the accuracy is neither 0 nor 1;
- `pascal_choice`: multiple choice, the true next word among three others;
- `pascal_rolling`: whole documents, `loglikelihood_rolling` (word/byte perplexity);
- `pascal_continue`: greedy generation of a few tokens, cut at the first "e".
"""

from __future__ import annotations

import importlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import yaml

from pascal_dist.config import to_yaml
from pascal_dist.config.schema import AttentionConfig, BiasConfig, ModelConfig, RunConfig
from pascal_dist.model import PascalGPT

LAMBADA, CHOICE, ROLLING, CONTINUE = "pascal_lambada", "pascal_choice", "pascal_rolling", "pascal_continue"
TASKS = (LAMBADA, CHOICE, ROLLING, CONTINUE)
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
BLOCK, STEP, WARMUP, THETA = 32, 4, 8, -0.6  # alpha(4) = 0.01 + 0.99 * 4 / 8 = 0.505, mid-ramp; s = 0.578


def require_extra(module: str):
    """The module, or a skip where the [hf]/[eval] extra is not installed; under CI=true (where `make test` installs
    the extras) a missing one fails instead, as tests.helpers.require_triton does."""
    if os.environ.get("CI") == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module)


@dataclass
class Export:
    """A safetensors export, its --format hf export, and the in-memory model both were made from."""

    safetensors_dir: str
    hf_dir: str
    model: PascalGPT
    tokenizer: Any
    cfg: RunConfig


def random_model(
    kind: str = "pascal", pascal_n: int = 3, window: int = 3, seed: int = 0
) -> tuple[PascalGPT, RunConfig]:
    """kind: pascal (theta moved off its init, alpha mid-ramp), learned (a fixed non-zero band) or none."""
    torch.manual_seed(seed)
    cfg = RunConfig()
    cfg.model = ModelConfig(
        vocab_size=512,
        block_size=BLOCK,
        n_layer=2,
        n_head=2,
        n_embd=32,
        dropout=0.0,
        attn_dropout=0.0,
        attention=AttentionConfig(backend="none" if kind == "none" else "sdpa"),
        bias=BiasConfig(
            kind="learned" if kind == "learned" else "pascal", pascal_n=pascal_n, window=window, warmup_steps=WARMUP
        ),
    )
    model = PascalGPT(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
        if kind == "pascal":
            model.bias.theta.fill_(THETA)  # away from theta_init: the export must carry the trained value
        elif kind == "learned":
            model.bias.band.copy_(torch.linspace(1.5, -0.5, window))
    model.set_bias_step(STEP)
    return model, cfg


def write_safetensors_export(model: PascalGPT, cfg: RunConfig, tiny_data: str, out: str) -> str:
    """pascal-dist's export layout, made by hand as tests/unit/eval/test_evaluate.py does: model.safetensors,
    config.yaml, tokenizer.json and export.json (the step)."""
    from safetensors.torch import save_model

    os.makedirs(out)
    cfg.data.dir = tiny_data
    save_model(model, os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    shutil.copyfile(os.path.join(tiny_data, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "export.json"), "w") as f:
        json.dump({"checkpoint": "none (made by a test)", "step": int(model.bias_step), "n_params": 0}, f)
    return out


def make_export(root: str, tiny_data: str, kind: str = "pascal", pascal_n: int = 3, window: int = 3) -> Export:
    """A random model written as a safetensors export, then through the real `--format hf` export."""
    from tokenizers import Tokenizer

    from pascal_dist.eval.hf_export import export_hf

    model, cfg = random_model(kind, pascal_n, window)
    st = write_safetensors_export(model, cfg, tiny_data, os.path.join(root, "safetensors"))
    hf = export_hf(st, os.path.join(root, "hf"))
    return Export(st, hf, model, Tokenizer.from_file(os.path.join(tiny_data, "tokenizer.json")), cfg)


def go_offline(monkeypatch) -> None:
    """No hub access from here on: the environment for new processes, and the flags the hub clients already imported
    in this process read (they read the environment only at import)."""
    import datasets.config
    import huggingface_hub.constants

    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


def corpus_words() -> list[str]:
    """The words of the first embedded play after its cast list, in order."""
    from pascal_dist.data.prepare import embedded_files

    with open(embedded_files()[0]) as f:
        text = f.read()
    return text[text.index("ACT I.") :].split()


def greedy(model: Any, ids: list[int]) -> int:
    """The model's argmax next token after `ids` (which must fit its context)."""
    with torch.no_grad():
        return int(model(torch.tensor([ids]))[0][0, -1].argmax())


def final_word(tokenizer: Any, ids: list[int]) -> str | None:
    """The word whose encoding is exactly `ids`, when the tokens' pieces join into one word (no whitespace, no special
    token: a trained model's greedy choice is often punctuation, ",and" is one word here), else None."""
    pieces = [tokenizer.id_to_token(t) for t in ids]
    word = "".join(pieces)
    if any(p.startswith("[") and p.endswith("]") for p in pieces) or not word or any(c.isspace() for c in word):
        return None
    return word if tokenizer.encode(word, add_special_tokens=False).ids == ids else None


def lambada_passages(model: Any, tokenizer: Any, block_size: int, n: int = 24, seed: int = 0) -> list[dict]:
    """n passages {"text", "made"}: a third end as the corpus does (made=0); the rest end with a word the model
    predicts greedily at every one of its tokens, exactly as both scorers see the context (made = its token count).

    A target's tokens are predicted from the last block_size tokens before each of them, so the greedy tokens are
    taken from the same truncated windows: t1 after the last block_size - 1 context tokens, t2 after those and t1."""
    rng, words, out = random.Random(seed), corpus_words(), []
    attempts = 0
    while len(out) < n and attempts < 50 * n:
        attempts += 1
        start, length = rng.randrange(len(words) - 80), rng.randrange(8, 45)  # some contexts exceed block_size tokens
        context = words[start : start + length]
        want = (0, 1, 2)[len(out) % 3]
        if want == 0:
            out.append({"text": " ".join(context + [words[start + length]]), "made": 0})
            continue
        ids = tokenizer.encode(" ".join(context), add_special_tokens=False).ids
        prefix = ids[-(block_size - 1) :] if want == 2 else ids[-block_size:]
        target = [greedy(model, prefix)]
        if want == 2:
            target.append(greedy(model, prefix + target))
        word = final_word(tokenizer, target)
        if word is not None:
            out.append({"text": " ".join(context + [word]), "made": want})
    assert len(out) == n, f"only {len(out)} of {n} passages could be made"
    return out


def choice_docs(n: int = 12, seed: int = 1) -> list[dict]:
    rng, words = random.Random(seed), corpus_words()
    docs = []
    for _ in range(n):
        start = rng.randrange(len(words) - 40)
        context, answer = words[start : start + rng.randrange(6, 20)], words[start + 20]
        choices = [answer] + rng.sample([w for w in words[:2000] if w != answer], 3)
        rng.shuffle(choices)
        docs.append({"context": " ".join(context), "choices": choices, "label": choices.index(answer)})
    return docs


def rolling_docs(n: int = 6, seed: int = 2) -> list[dict]:
    """Documents of 3 to 90 words: several span more than one window of a 32-token model."""
    rng, words = random.Random(seed), corpus_words()
    docs = []
    for _ in range(n):
        start = rng.randrange(len(words) - 100)
        docs.append({"text": " ".join(words[start : start + rng.randrange(3, 90)])})
    return docs


def continue_docs(n: int = 8, seed: int = 3) -> list[dict]:
    rng, words = random.Random(seed), corpus_words()
    docs = []
    for _ in range(n):
        start = rng.randrange(len(words) - 40)
        length = rng.randrange(5, 25)
        docs.append({"context": " ".join(words[start : start + length]), "target": words[start + length]})
    return docs


def single_token_text(tokenizer: Any, n_tokens: int) -> str:
    """Corpus words that are one token each, n_tokens of them: a document whose token count is exactly n_tokens."""
    picked = []
    for w in corpus_words():
        if w.isalpha() and len(tokenizer.encode(w, add_special_tokens=False).ids) == 1:
            picked.append(w)
            if len(picked) == n_tokens:
                break
    text = " ".join(picked)
    assert len(tokenizer.encode(text, add_special_tokens=False).ids) == n_tokens
    return text


def task_yamls(data_dir: str) -> dict[str, dict]:
    def local(name: str) -> dict:
        return {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": os.path.join(data_dir, f"{name}.jsonl")}},
            "test_split": "test",
            "metadata": {"version": 1.0},
        }

    return {
        # lm-eval's lambada_openai.yaml, on local passages
        LAMBADA: local(LAMBADA)
        | {
            "output_type": "loglikelihood",
            "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
            "doc_to_target": "{{' '+text.split(' ')[-1]}}",
            "metric_list": [
                {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            ],
        },
        CHOICE: local(CHOICE)
        | {
            "output_type": "multiple_choice",
            "doc_to_text": "{{context}}",
            "doc_to_choice": "choices",
            "doc_to_target": "label",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        },
        ROLLING: local(ROLLING)
        | {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
        },
        CONTINUE: local(CONTINUE)
        | {
            "output_type": "generate_until",
            "doc_to_text": "{{context}}",
            "doc_to_target": "{{target}}",
            # stop at "e": the random model's words contain one, so cutting at a stop sequence is exercised
            "generation_kwargs": {"until": ["e"], "max_gen_toks": 6, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        },
    }


def write_tasks(out_dir: str, docs: dict[str, list[dict]]) -> str:
    """The task YAMLs and their jsonl data (docs: task name -> documents) in out_dir; returns out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    configs = task_yamls(out_dir)
    for name, task_docs in docs.items():
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(doc) + "\n" for doc in task_docs)
        with open(os.path.join(out_dir, f"{name}.yaml"), "w") as f:
            yaml.safe_dump(configs[name], f, sort_keys=False)
    return out_dir


def all_docs(model: Any, tokenizer: Any, block_size: int) -> dict[str, list[dict]]:
    return {
        LAMBADA: lambada_passages(model, tokenizer, block_size),
        CHOICE: choice_docs(),
        ROLLING: rolling_docs(),
        CONTINUE: continue_docs(),
    }
