"""The transformers export and lm-eval on a real run: the step-6 checkpoint of the 2-rank ZeRO-2 run that
tests/conftest.py's `stage_runs` trains (bias warm-up over 8 steps, so alpha is mid-ramp, and theta trained), exported
by `python -m pascal_dist export ... --format hf` in its own process, checked against pascal-dist's model of the same
checkpoint for every length, and scored by `python -m pascal_dist lm-eval` (offline, a local LAMBADA-style task)
against evaluate.py's last_word_acc on the checkpoint itself.
"""

import json
import os

import pytest
import torch

from pascal_dist.eval.evaluate import EvalRequest, evaluate, open_model
from pascal_dist.train.checkpoint import list_tags
from tests.helpers import run_python
from tests.hf_helpers import LAMBADA, go_offline, lambada_passages, require_extra, write_tasks

pytestmark = pytest.mark.slow

require_extra("transformers")
require_extra("lm_eval")

WARMUP = 8  # model.bias.warmup_steps of tests.helpers.TINY


def test_hf_export_of_a_trained_checkpoint_and_lm_eval_on_it(stage_runs, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    go_offline(monkeypatch)
    ckpt_dir = os.path.join(stage_runs[2], "checkpoints")
    tag = list_tags(ckpt_dir)[0]
    step, tag_dir = int(tag.removeprefix("step")), os.path.join(ckpt_dir, tag)
    assert 0 < step < WARMUP  # mid-ramp: a wrong alpha would show

    out = tmp_path / "hf"
    proc = run_python("-m", "pascal_dist", "export", tag_dir, str(out), "--format", "hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    opened = open_model(tag_dir)  # pascal-dist's own model of the checkpoint
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    logged = [json.loads(line) for line in open(os.path.join(stage_runs[2], "rank_sync.jsonl"))]
    theta = next(r for r in logged if r["step"] == step)["ranks"][0]["theta"]
    assert hf.config.pascal_alpha == pytest.approx(0.01 + 0.99 * step / WARMUP, abs=1e-7)
    assert float(hf.bias.theta.detach()) == theta != -1.5  # trained, the fp32 master value

    block = opened.cfg.model.block_size
    ids = torch.randint(0, opened.cfg.model.vocab_size, (2, block), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n in range(1, block + 1):
            diff = (hf(ids[:, :n], use_cache=False).logits - opened.model(ids[:, :n])[0]).abs().max()
            assert float(diff) < 1e-5, n
    tokens = step * 4 * 2 * 2 * block  # micro batch 4 x accumulation 2 x 2 ranks x block, per step
    assert f"{tokens:,} tokens" in (out / "README.md").read_text()

    tasks = write_tasks(str(tmp_path / "tasks"), {LAMBADA: lambada_passages(opened.model, opened.tokenizer, block)})
    results_file = tmp_path / "results.json"
    proc = run_python(
        "-m", "pascal_dist", "lm-eval", str(out), "--tasks", LAMBADA, "--include_path", tasks,
        "--bootstrap_iters", "0", "--output_path", str(results_file),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = json.load(open(results_file))["results"][LAMBADA]["acc,none"]
    request = EvalRequest(model=tag_dir, heldout=False, lambada=os.path.join(tasks, f"{LAMBADA}.jsonl"))
    expected = evaluate(request, 0, 1, torch.device("cpu"))["results"]["lambada"]["last_word_acc"]
    assert acc == pytest.approx(expected, abs=1e-12) and 0 < acc < 1
