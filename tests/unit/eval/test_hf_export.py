"""The transformers export against PascalGPT: logits for every length, with and without the KV cache and with left
padding, greedy generation, the tokenizer, the files (model card, auto_map, the dual pascal-dist format), loading where
pascal_dist cannot be imported, and the command line."""

import ast
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.hf_helpers import BLOCK, OFFLINE, STEP, THETA, WARMUP, corpus_words, make_export, require_extra

require_extra("transformers")

TOL = 1e-5  # fp32 on CPU


def load_hf(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()


def token_ids(n: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (batch, n), generator=torch.Generator().manual_seed(seed))


def max_diff_over_lengths(hf, model) -> float:
    """The largest |logit difference| between the two models over every length 1 .. block_size."""
    ids, worst = token_ids(BLOCK), 0.0
    with torch.no_grad():
        for n in range(1, BLOCK + 1):
            ours = model(ids[:, :n])[0]
            theirs = hf(ids[:, :n], use_cache=False).logits
            assert torch.isfinite(theirs).all()
            worst = max(worst, float((ours - theirs).abs().max()))
    return worst


@pytest.fixture(scope="module")
def variants(tiny_data, tmp_path_factory):
    """Exports of the other band shapes: a wider pyramid band, the learned band, and no bias."""
    root = tmp_path_factory.mktemp("variants")
    return {
        "pascal n=4 window=5": make_export(str(root / "wide"), tiny_data, pascal_n=4, window=5),
        "learned window=4": make_export(str(root / "learned"), tiny_data, kind="learned", window=4),
        "none": make_export(str(root / "none"), tiny_data, kind="none"),
    }


def test_logits_equal_pascal_gpt_for_every_length(pascal_export, variants):
    for name, export in [("pascal n=3 window=3", pascal_export), *variants.items()]:
        assert max_diff_over_lengths(load_hf(export.hf_dir), export.model) < TOL, name


@pytest.mark.parametrize("mistake", ["band sign", "band one diagonal off", "alpha of step 0"])
def test_the_logit_check_sees_a_wrong_band(pascal_export, monkeypatch, mistake):
    """The comparison above fails for the mistakes it guards against: each changes the logits by far more than TOL."""
    hf = load_hf(pascal_export.hf_dir)
    module = sys.modules[type(hf).__module__]
    if mistake == "band sign":
        original = type(hf.bias).forward
        monkeypatch.setattr(type(hf.bias), "forward", lambda self: -original(self))
    elif mistake == "band one diagonal off":  # distance d gets a_(d+1); the causal mask stays right
        original = module.band_mask
        shifted = lambda band, dist: original(band, dist + 1).masked_fill(dist < 0, float("-inf"))
        monkeypatch.setattr(module, "band_mask", shifted)
    else:
        hf.bias.alpha = 0.01
    assert max_diff_over_lengths(hf, pascal_export.model) > 1e-3


def test_the_export_carries_alpha_at_its_step_and_the_trained_theta(pascal_export):
    hf = load_hf(pascal_export.hf_dir)
    assert hf.config.pascal_alpha == pytest.approx(0.01 + 0.99 * STEP / WARMUP, abs=1e-7)
    assert hf.config.pascal_step == STEP and hf.config.bias_kind == "pascal"
    assert float(hf.bias.theta.detach()) == pytest.approx(THETA)
    assert hf.bias.theta.requires_grad  # theta stays a parameter that training can move
    assert torch.equal(hf.band(), pascal_export.model.band())  # the same float32 operations: bitwise


def test_kv_cache_decoding_equals_the_full_forward(pascal_export):
    """Prefill, then one token at a time through transformers' DynamicCache: position i's query sees cached key j
    with band[i - j], so every step's logits equal PascalGPT's full forward at that position."""
    from transformers import DynamicCache

    hf, ids = load_hf(pascal_export.hf_dir), token_ids(BLOCK)
    with torch.no_grad():
        full = pascal_export.model(ids)[0]
        for prefill in (1, 7):
            cache = DynamicCache(config=hf.config)
            steps = [hf(ids[:, :prefill], cache=cache, use_cache=True).logits]
            for i in range(prefill, BLOCK):
                steps.append(hf(ids[:, i : i + 1], cache=cache, use_cache=True).logits)
            assert cache.get_seq_length() == BLOCK
            assert float((torch.cat(steps, dim=1) - full).abs().max()) < TOL


def test_left_padding_changes_no_real_token(pascal_export):
    hf, ids = load_hf(pascal_export.hf_dir), token_ids(20, batch=1)
    eos = pascal_export.tokenizer.token_to_id("[EOS]")
    padded = torch.cat([torch.full((1, 6), eos), ids[:, :14]], dim=1)  # row 0: 6 pads, then 14 tokens
    batch = torch.cat([padded, ids], dim=0)
    mask = torch.ones_like(batch)
    mask[0, :6] = 0
    with torch.no_grad():
        logits = hf(batch, attention_mask=mask, use_cache=False).logits
        assert torch.isfinite(logits).all()
        assert float((logits[0, 6:] - pascal_export.model(ids[:, :14])[0][0]).abs().max()) < TOL
        assert float((logits[1] - pascal_export.model(ids)[0][0]).abs().max()) < TOL


def test_greedy_generate_equals_pascal_dist_generate(pascal_export):
    """transformers' generate() (its KV cache, left-padded batch) gives pascal_dist.model.generate's greedy ids."""
    from transformers import AutoTokenizer

    from pascal_dist.model.generate import generate_ids

    hf, tok = load_hf(pascal_export.hf_dir), AutoTokenizer.from_pretrained(pascal_export.hf_dir)
    eos = tok.eos_token_id
    prompts = [" ".join(corpus_words()[:n]) for n in (2, 6)]
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    new_tokens = BLOCK - batch.input_ids.shape[1]  # the whole context: positions are learned, block_size of them
    assert new_tokens >= 8
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
    for row, prompt in zip(out.tolist(), prompts):
        ids = tok(prompt).input_ids
        expected = generate_ids(pascal_export.model, ids, new_tokens, seed=0, temperature=0.0, eos_id=eos)
        got = row[batch.input_ids.shape[1] :]
        got = got[: got.index(eos)] if eos in got else got
        assert got == expected and len(expected) > 0


def test_tokenizer_is_the_trained_one_with_eos_as_eos_and_pad(pascal_export):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(pascal_export.hf_dir)
    assert isinstance(tok, PreTrainedTokenizerFast)
    eos = pascal_export.tokenizer.token_to_id("[EOS]")
    assert (tok.eos_token, tok.pad_token, tok.eos_token_id, tok.pad_token_id) == ("[EOS]", "[EOS]", eos, eos)
    assert tok.bos_token is None  # lm-eval then takes [EOS] as the prefix token, as pascal-dist's model does
    text = " ".join(corpus_words()[:200])
    ids = pascal_export.tokenizer.encode(text, add_special_tokens=False).ids
    assert tok(text).input_ids == ids and tok.decode(ids) == pascal_export.tokenizer.decode(ids)
    with open(os.path.join(pascal_export.hf_dir, "tokenizer.json"), "rb") as a:
        with open(os.path.join(pascal_export.safetensors_dir, "tokenizer.json"), "rb") as b:
            assert a.read() == b.read()  # byte for byte the trained file


def test_files_model_card_and_the_dual_pascal_dist_format(pascal_export):
    from pascal_dist.eval.export import load_exported

    out = pascal_export.hf_dir
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["auto_map"] == {
        "AutoConfig": "configuration_pascal.PascalConfig",
        "AutoModelForCausalLM": "modeling_pascal.PascalForCausalLM",
    }
    assert config["model_type"] == "pascal_gpt" and config["architectures"] == ["PascalForCausalLM"]
    card = open(os.path.join(out, "README.md")).read()
    assert f"step {STEP}" in card and "alpha = 0.505" in card and "trust_remote_code=True" in card
    assert f"theta = {THETA:.6g}" in card
    model, cfg, _ = load_exported(out)  # the same directory is a pascal-dist export too
    assert int(model.bias_step) == STEP and cfg.model.n_layer == 2
    ids = token_ids(BLOCK)
    with torch.no_grad():
        assert torch.equal(model(ids)[0], pascal_export.model(ids)[0])


def test_the_modeling_code_imports_only_torch_and_transformers(pascal_export):
    for name in ("modeling_pascal.py", "configuration_pascal.py"):
        tree = ast.parse(open(os.path.join(pascal_export.hf_dir, name)).read())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert roots <= {"__future__", "dataclasses", "math", "torch", "transformers"}, (name, roots)


LOAD_WITHOUT_PASCAL_DIST = """
import json, sys
sys.modules["pascal_dist"] = None  # any import of pascal_dist now raises ImportError
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(path)
ids = torch.tensor([json.loads(sys.argv[2])])
with torch.no_grad():
    logits = model(ids).logits[0].tolist()
    new = model.generate(ids, max_new_tokens=5, do_sample=False)[0, ids.shape[1]:].tolist()
blocked = sys.modules["pascal_dist"] is None
with open(sys.argv[3], "w") as f:
    json.dump({"logits": logits, "new": new, "eos": tok.eos_token_id, "blocked": blocked}, f)
"""


def test_loads_where_pascal_dist_cannot_be_imported(pascal_export, tmp_path):
    from pascal_dist.model.generate import generate_ids

    ids = token_ids(12, batch=1)[0].tolist()
    env = dict(os.environ, **OFFLINE, HF_HOME=str(tmp_path / "hf_home"))  # a fresh cache for the remote code
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PASCAL_DIST, pascal_export.hf_dir, json.dumps(ids), str(tmp_path / "out")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "out").read_text())
    assert got["blocked"]
    with torch.no_grad():
        ours = pascal_export.model(torch.tensor([ids]))[0][0]
    assert float((torch.tensor(got["logits"]) - ours).abs().max()) < TOL
    assert got["new"] == generate_ids(pascal_export.model, ids, 5, seed=0, temperature=0.0, eos_id=got["eos"])


def test_cli_export_format_hf(pascal_export, tmp_path, capsys):
    from pascal_dist import cli

    out = tmp_path / "hf"
    assert cli.main(["export", pascal_export.safetensors_dir, str(out), "--format", "hf"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert max_diff_over_lengths(load_hf(str(out)), pascal_export.model) < TOL
    capsys.readouterr()  # transformers' loading progress
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("someone's file")
    for args in (
        [pascal_export.safetensors_dir, str(tmp_path / "full")],  # a non-empty output directory
        [str(tmp_path / "nope"), str(tmp_path / "new")],  # no such source
        [str(tmp_path / "full"), str(tmp_path / "new")],  # neither a checkpoint nor an export
    ):
        assert cli.main(["export", *args, "--format", "hf"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
    assert (tmp_path / "full" / "mine.txt").read_text() == "someone's file" and not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []  # nothing half-written is left


def test_without_transformers_the_export_says_what_to_install(pascal_export, tmp_path, monkeypatch, capsys):
    from pascal_dist import cli

    monkeypatch.setitem(sys.modules, "transformers", None)
    assert cli.main(["export", pascal_export.safetensors_dir, str(tmp_path / "hf"), "--format", "hf"]) == 2
    assert "pip install 'pascal-dist[hf]'" in capsys.readouterr().err
