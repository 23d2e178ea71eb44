"""The lm-eval model `pascal-dist` and `pascal-dist lm-eval`, offline on local tasks, against pascal-dist's own
evaluation and against lm-eval's `hf` model on the transformers export:

- LAMBADA: lm-eval's `acc` (the target " " + last word, greedy at every token) equals evaluate.py's last_word_acc,
  passage by passage. The two definitions meet because the tokenizer's Whitespace pre-tokenizer encodes " word" and
  "word" alike, so lm-eval's continuation tokens are evaluate.py's final-word tokens, and both feed the last
  block_size tokens before the target's last one;
- rolling loglikelihood: lm-eval's windows (disjoint, [EOS] first) score a document as evaluate.py's nll_sums does
  over [EOS] + the document with stride = block_size, for documents of a whole number of windows;
- the `pascal-dist` and `hf` models give the same metrics and the same per-example answers on all four tasks.
"""

import json
import os

import numpy as np
import pytest
import torch

from pascal_dist.eval.evaluate import EvalRequest, evaluate, lambada_examples, lambada_sums, nll_sums
from tests.hf_helpers import (
    BLOCK,
    CHOICE,
    CONTINUE,
    LAMBADA,
    ROLLING,
    STEP,
    TASKS,
    go_offline,
    require_extra,
    single_token_text,
)

require_extra("lm_eval")
require_extra("transformers")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    go_offline(monkeypatch)


def hf_model_args(path: str) -> dict:
    return {"pretrained": path, "trust_remote_code": True, "backend": "causal", "dtype": "float32", "device": "cpu"}


@pytest.fixture(scope="module")
def backend_results(pascal_export, lm_eval_tasks):
    """Every local task through both lm-eval models: {"pascal-dist": results, "hf": results}, with samples."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from pascal_dist.eval.lm_eval_model import LmEvalRequest, run_lm_eval

    with pytest.MonkeyPatch.context() as mp:
        go_offline(mp)
        request = LmEvalRequest(
            model=pascal_export.hf_dir,
            tasks=list(TASKS),
            include_path=lm_eval_tasks,
            batch_size=4,
            device="cpu",
            bootstrap_iters=0,
            log_samples=True,
        )
        ours = run_lm_eval(request)  # the task manager indexes the local tasks only: they are all it needs
        theirs = simple_evaluate(
            model="hf",
            model_args=hf_model_args(pascal_export.hf_dir),
            tasks=list(TASKS),
            batch_size=4,
            bootstrap_iters=0,
            log_samples=True,
            task_manager=TaskManager(include_path=lm_eval_tasks, include_defaults=False),
        )
    return {"pascal-dist": ours, "hf": theirs}


def samples(results: dict, task: str) -> list[dict]:
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def test_lambada_accuracy_equals_evaluate_last_word_acc(backend_results, pascal_export, lm_eval_tasks):
    path = os.path.join(lm_eval_tasks, f"{LAMBADA}.jsonl")
    docs = [json.loads(line) for line in open(path)]
    request = EvalRequest(model=pascal_export.hf_dir, heldout=False, lambada=path, batch_size=4)
    ours = evaluate(request, 0, 1, torch.device("cpu"))["results"]["lambada"]
    examples = lambada_examples([d["text"] for d in docs], pascal_export.tokenizer)
    right = [lambada_sums(pascal_export.model, [ex], BLOCK)[1] == 1 for ex in examples]
    # the passages ending with the model's own greedy word (one or two tokens) are right, so the accuracy is neither
    # 0 nor 1 and a misaligned continuation would show
    assert all(ok for ok, d in zip(right, docs) if d["made"]) and {1, 2} <= {d["made"] for d in docs}
    assert 0 < ours["last_word_acc"] < 1 and ours["multi_token_words"] > 0
    for backend, results in backend_results.items():
        assert results["results"][LAMBADA]["acc,none"] == pytest.approx(ours["last_word_acc"], abs=1e-12), backend
        assert [bool(s["acc"]) for s in samples(results, LAMBADA)] == right, backend


@pytest.fixture(scope="module")
def lms(pascal_export):
    """Both lm-eval models on the export, built once: {"pascal-dist": PascalLM, "hf": HFLM}."""
    from lm_eval.models.huggingface import HFLM

    from pascal_dist.eval.lm_eval_model import register

    with pytest.MonkeyPatch.context() as mp:
        go_offline(mp)
        return {
            "pascal-dist": register()(path=pascal_export.hf_dir, batch_size=4, device="cpu"),
            "hf": HFLM(**hf_model_args(pascal_export.hf_dir), batch_size=4),
        }


@pytest.mark.parametrize("n_tokens", [5, BLOCK, 3 * BLOCK])
def test_rolling_loglikelihood_equals_evaluate_nll(lms, pascal_export, n_tokens):
    """lm-eval's first window is [EOS] + the first block_size - 1 tokens, predicting the first block_size tokens;
    each later one feeds the block_size tokens before the ones it predicts. That is nll_sums over [EOS] + document
    with stride = block_size, as long as the last window is full (with a partial last window lm-eval gives it more
    context, a full block_size tokens, than a stride-aligned window has)."""
    from lm_eval.api.instance import Instance

    text = single_token_text(pascal_export.tokenizer, n_tokens)
    ids = pascal_export.tokenizer.encode(text, add_special_tokens=False).ids
    eos = pascal_export.tokenizer.token_to_id("[EOS]")
    nll, scored = nll_sums(pascal_export.model, np.array([eos] + ids), BLOCK, stride=BLOCK)
    assert scored == n_tokens
    request = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)]
    for backend, lm in lms.items():
        assert lm.loglikelihood_rolling(request)[0] == pytest.approx(-nll, rel=1e-5), backend
    if n_tokens > BLOCK:  # the check tells window conventions apart: another stride, or no [EOS] prefix, differs
        half_stride, _ = nll_sums(pascal_export.model, np.array([eos] + ids), BLOCK, stride=BLOCK // 2)
        no_prefix, _ = nll_sums(pascal_export.model, np.array(ids), BLOCK, stride=BLOCK)
        assert abs(half_stride - nll) > 1e-3 * nll and abs(no_prefix - nll) > 1e-3 * nll


def test_pascal_dist_and_hf_models_agree(backend_results):
    ours, theirs = backend_results["pascal-dist"], backend_results["hf"]
    for task in TASKS:
        a, b = ours["results"][task], theirs["results"][task]
        metrics = [k for k, v in a.items() if isinstance(v, float) and "stderr" not in k]
        assert metrics, task
        for key in metrics:
            assert a[key] == pytest.approx(b[key], rel=1e-5), (task, key)
        for sa, sb in zip(samples(ours, task), samples(theirs, task), strict=True):
            if task == CONTINUE:
                assert sa["filtered_resps"] == sb["filtered_resps"], sa["doc"]
            else:  # (loglikelihood, is_greedy) per choice, or the document's rolling loglikelihood
                ra, rb = np.array(sa["filtered_resps"], dtype=float), np.array(sb["filtered_resps"], dtype=float)
                np.testing.assert_allclose(ra, rb, rtol=1e-5, atol=1e-4)
    generated = [s["filtered_resps"][0] for s in samples(ours, CONTINUE)]
    assert sum(bool(g.strip()) for g in generated) >= len(generated) // 2  # the compared generations are not empty
    assert len(samples(ours, CHOICE)) == 12 and len(samples(ours, ROLLING)) == 6


def test_the_model_is_registered_and_refuses_unknown_arguments(pascal_export):
    from lm_eval.api.registry import get_model

    from pascal_dist.eval.lm_eval_model import LmEvalError, register

    assert get_model("pascal-dist") is register()
    with pytest.raises(LmEvalError, match="unknown model_args"):
        register()(path=pascal_export.hf_dir, temperature=1)
    with pytest.raises(LmEvalError, match="batch_size='auto'"):
        register()(path=pascal_export.hf_dir, batch_size="auto")


def test_cli_runs_tasks_prints_the_table_and_writes_json(pascal_export, lm_eval_tasks, tmp_path, capsys):
    from pascal_dist import cli
    from pascal_dist.eval.lm_eval_model import save_lm_eval

    out = tmp_path / "results"
    args = ["lm-eval", pascal_export.hf_dir, "--tasks", LAMBADA, "--include_path", lm_eval_tasks, "--limit", "6"]
    args += ["--batch_size", "4", "--bootstrap_iters", "0", "--output_path", str(out)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert LAMBADA in printed and "acc" in printed and f"written to {out}" in printed
    results = json.load(open(out / "lm_eval_results.json"))
    assert results["config"]["model_step"] == STEP and results["config"]["model_source"] == pascal_export.hf_dir
    path = os.path.join(lm_eval_tasks, f"{LAMBADA}.jsonl")
    request = EvalRequest(model=pascal_export.hf_dir, heldout=False, lambada=path, limit=6)
    expected = evaluate(request, 0, 1, torch.device("cpu"))["results"]["lambada"]["last_word_acc"]
    assert results["results"][LAMBADA]["acc,none"] == pytest.approx(expected, abs=1e-12)
    assert save_lm_eval(results, str(out)) != str(out / "lm_eval_results.json")  # never over an earlier file
    assert len(os.listdir(out)) == 2


@pytest.fixture(scope="module")
def full_task_manager(lm_eval_tasks):
    """lm-eval's own tasks and the local ones: the index `pascal-dist lm-eval` builds for a task it does not find
    under --include_path (seconds: built once here)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=lm_eval_tasks)


def test_standard_tasks_are_known_and_local_tasks_skip_lm_evals_index(full_task_manager, lm_eval_tasks):
    from pascal_dist.eval.lm_eval_model import resolve_tasks, task_manager_for

    standard = ["lambada_openai", "hellaswag", "arc_easy", "piqa", "wikitext"]  # the ones docs/evaluation.md names
    assert resolve_tasks(standard + [LAMBADA], full_task_manager) == standard + [LAMBADA]
    assert sorted(task_manager_for([LAMBADA, CHOICE], lm_eval_tasks).all_tasks) == sorted(TASKS)


def test_cli_bad_input_is_one_line_and_exit_2(
    pascal_export, lm_eval_tasks, full_task_manager, tmp_path, capsys, monkeypatch
):
    from pascal_dist import cli
    from pascal_dist.eval import lm_eval_model

    # an unknown name makes the command index lm-eval's own tasks too: hand it the index already built
    monkeypatch.setattr(lm_eval_model, "task_manager_for", lambda names, include_path: full_task_manager)

    cases = {
        "unknown lm-eval task 'pascal_lambda' (did you mean pascal_lambada": [
            pascal_export.hf_dir,
            "--tasks",
            "pascal_lambda",
            "--include_path",
            lm_eval_tasks,
        ],
        "nope': no such directory": [str(tmp_path / "nope"), "--tasks", LAMBADA],
        "is not a pascal-dist checkpoint": [str(tmp_path), "--tasks", LAMBADA],
        "--include_path": [pascal_export.hf_dir, "--tasks", LAMBADA, "--include_path", str(tmp_path / "none")],
        "--tasks ','": [pascal_export.hf_dir, "--tasks", ","],
        "--limit 0": [pascal_export.hf_dir, "--tasks", LAMBADA, "--limit", "0"],
    }
    for expected, args in cases.items():
        assert cli.main(["lm-eval", *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], (expected, err)
