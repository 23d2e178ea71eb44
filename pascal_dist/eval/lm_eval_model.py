"""The lm-evaluation-harness model `pascal-dist` (loglikelihoods, rolling loglikelihoods and generation over PascalGPT)
and the run of lm-eval tasks behind `pascal-dist lm-eval`.

The model opens what every pascal-dist command opens (an exported directory, safetensors or transformers, or a
checkpoint) and follows the conventions of lm-eval's own `hf` model, so that both give the same numbers on a
transformers export: a (context, continuation) pair is scored on (context + continuation)[-(block_size + 1):][:-1];
rolling loglikelihoods use lm-eval's own windows (`get_rolling_token_windows` with context_len 1, made disjoint, with
[EOS] as the prefix token); generation keeps the last block_size - max_gen_toks context tokens.

lm_eval is imported inside functions: importing this module needs neither lm-eval nor transformers. `register()`
defines the lm-eval model class and registers it under `pascal-dist` on first use.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from pascal_dist.errors import UserError
from pascal_dist.eval.evaluate import open_model, unique_path
from pascal_dist.eval.export import WEIGHTS, resolve_checkpoint

MODEL_NAME = "pascal-dist"
EOS = "[EOS]"


class LmEvalError(UserError, ValueError):
    """Bad input to the lm-eval model or command: an unknown task, a path that holds no model, a bad argument."""


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise LmEvalError("pascal-dist lm-eval needs lm-evaluation-harness: pip install 'pascal-dist[eval]'") from None


class PascalScorer:
    """What lm-eval asks of a causal language model, answered by an opened PascalGPT in float32."""

    def __init__(self, path: str, device: str | None = None, batch_size: int = 8) -> None:
        if batch_size < 1:
            raise LmEvalError(f"batch_size={batch_size}: expected >= 1")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        opened = open_model(path, self.device)
        self.model, self.tokenizer, self.batch_size = opened.model.float(), opened.tokenizer, batch_size
        self.block_size = opened.cfg.model.block_size
        self.eos_id = self.tokenizer.token_to_id(EOS)
        self.source, self.step = opened.source, opened.step

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))  # special tokens ([EOS]) dropped, as lm-eval's hf model decodes

    @torch.no_grad()
    def loglikelihoods(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives the continuation) per (context ids,
        continuation ids), scored together in batches of similar length."""
        L, out = self.block_size, [None] * len(pairs)
        for _, cont in pairs:
            if not cont or len(cont) > L:
                raise LmEvalError(f"a continuation of {len(cont)} tokens: expected 1 to block_size={L}")
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            seqs = [(pairs[i][0] + pairs[i][1])[-(L + 1) :][:-1] for i in chunk]
            x = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
            for r, s in enumerate(seqs):  # right padding: causal attention never lets it reach a scored position
                x[r, : len(s)] = torch.tensor(s)
            logp = F.log_softmax(self.model(x.to(self.device))[0].float(), dim=-1)
            for r, i in enumerate(chunk):
                cont, n = torch.tensor(pairs[i][1], device=self.device), len(seqs[r])
                scored = logp[r, n - len(cont) : n]  # (len(cont), vocab): the positions that predict the continuation
                loglik = scored.gather(-1, cont[:, None]).double().sum()
                out[i] = (float(loglik), bool((scored.argmax(-1) == cont).all()))
        return out

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """lm-eval's disjoint windows over the whole text: every token scored once, the first after [EOS]."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows = get_rolling_token_windows(
            token_list=self.encode(text), prefix_token=self.eos_id, max_seq_len=self.block_size, context_len=1
        )
        return [make_disjoint_window(w) for w in windows]

    def rolling_loglikelihoods(self, texts: Sequence[str]) -> list[float]:
        """log p(text) per text, its windows scored together with every other text's."""
        windows = [self.rolling_windows(t) for t in texts]
        scores = iter(self.loglikelihoods([w for ws in windows for w in ws]))
        return [sum(next(scores)[0] for _ in ws) for ws in windows]

    def generate(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        """The continuation of `context` under lm-eval's generation kwargs (until, max_gen_toks, do_sample, ...),
        cut at the first stop sequence."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        from pascal_dist.model.generate import generate_ids

        kwargs = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=256)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=EOS)
        max_gen_toks = int(kwargs.pop("max_gen_toks"))
        if not 0 < max_gen_toks < self.block_size:
            raise LmEvalError(f"max_gen_toks={max_gen_toks}: expected 1 to block_size - 1 = {self.block_size - 1}")
        sampling = {"temperature": 0.0, "top_k": None, "top_p": None}
        if kwargs.get("do_sample"):
            sampling = {
                "temperature": float(kwargs.get("temperature") or 1.0),
                "top_k": kwargs.get("top_k"),
                "top_p": kwargs.get("top_p"),
            }
        # an empty context starts a fresh document, as every document in training follows an [EOS]
        ids = self.encode(context)[-(self.block_size - max_gen_toks) :] or [self.eos_id]
        new = generate_ids(
            self.model, ids, max_gen_toks, seed=int(kwargs.get("seed", 0)), eos_id=self.eos_id, **sampling
        )
        return postprocess_generated_text(self.decode(new), stop=until, think_end_token=None)


@functools.cache
def register() -> type:
    """The lm-eval model class `pascal-dist`, registered with lm-eval's model registry (once per process)."""
    require_lm_eval()
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from tqdm import tqdm

    @register_model(MODEL_NAME)
    class PascalLM(TemplateLM):
        """model_args: path (exported dir or checkpoint), batch_size, device. loglikelihood comes from TemplateLM,
        which splits each (context, continuation) pair into tokens as lm-eval's hf model does."""

        def __init__(self, path: str, batch_size: int | str = 8, device: str | None = None, **ignored: Any) -> None:
            super().__init__()
            unknown = set(ignored) - {"max_batch_size"}  # simple_evaluate passes it to every model
            if unknown:
                raise LmEvalError(f"unknown model_args {sorted(unknown)} for '{MODEL_NAME}': path, batch_size, device")
            try:
                batch_size = int(batch_size)
            except ValueError:
                raise LmEvalError(f"batch_size={batch_size!r}: '{MODEL_NAME}' takes an integer") from None
            self.scorer = PascalScorer(str(path), device, batch_size)

        @property
        def eot_token_id(self) -> int:
            return self.scorer.eos_id

        def get_model_info(self) -> dict[str, Any]:
            """Which model was scored, for the results' config: the checkpoint or export, and its bias step."""
            return {"model_source": self.scorer.source, "model_step": self.scorer.step}

        @property
        def max_length(self) -> int:
            return self.scorer.block_size

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            return self.scorer.encode(string)  # the tokenizer adds no special token anyway

        def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
            return self.scorer.decode(tokens)

        def _loglikelihood_tokens(
            self, requests, disable_tqdm: bool = False, **kwargs: Any
        ) -> list[tuple[float, bool]]:
            results = self.scorer.loglikelihoods([(ctx, cont) for _, ctx, cont in requests])
            for (key, _, _), answer in zip(requests, results):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            texts = [req.args[0] for req in requests]
            results = self.scorer.rolling_loglikelihoods(texts)
            for text, total in zip(texts, results):
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            return results

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = []
            for req in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
                context, gen_kwargs = req.args
                out.append(self.scorer.generate(context, gen_kwargs))
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), out[-1])
            return out

    return PascalLM


def check_model_path(path: str) -> None:
    """Refuse, before anything slow, a path that is neither an exported model nor a checkpoint."""
    if not os.path.isdir(path):
        raise LmEvalError(f"'{path}': no such directory (expected an exported model or a checkpoint)")
    if not os.path.isfile(os.path.join(path, WEIGHTS)):
        resolve_checkpoint(path)  # raises ExportError naming the path


@dataclass
class LmEvalRequest:
    """What to run (the `pascal-dist lm-eval` flags, typed)."""

    model: str  # exported model dir (safetensors or hf), or a run dir / checkpoints dir / checkpoint tag dir
    tasks: list[str]
    include_path: str | None = None  # a directory of extra task YAMLs
    limit: int | None = None  # first N examples of each task
    batch_size: int = 8
    device: str | None = None
    num_fewshot: int | None = None
    bootstrap_iters: int = 100_000  # lm-eval's default; 0 skips the bootstrapped standard errors
    log_samples: bool = False


def resolve_tasks(names: Sequence[str], task_manager: Any) -> list[str]:
    """The names as given, once each is known to the task manager (a task, group or tag, or a glob); else an error
    naming the unknown ones and the closest known names."""
    unknown = [n for n in names if not task_manager.match_tasks([n])]
    if unknown:
        hints = {n: difflib.get_close_matches(n, task_manager.all_tasks, n=3) for n in unknown}
        said = "; ".join(f"'{n}'" + (f" (did you mean {', '.join(h)}?)" if h else "") for n, h in hints.items())
        raise LmEvalError(f"unknown lm-eval task {said}; `lm_eval ls tasks` lists them, --include_path adds a dir")
    return list(names)


def task_manager_for(names: Sequence[str], include_path: str | None) -> Any:
    """lm-eval's TaskManager: over include_path alone when it defines every named task (indexing lm-eval's own
    thousands of task YAMLs takes seconds), else over lm-eval's tasks and include_path together."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(name in local.all_subtasks for name in names):  # plain tasks: no group or tag that may reach further
            return local
    return TaskManager(include_path=include_path)


def run_lm_eval(request: LmEvalRequest) -> dict[str, Any]:
    """lm-eval's simple_evaluate on the `pascal-dist` model; returns its results dict."""
    require_lm_eval()
    check_model_path(request.model)
    if request.include_path is not None and not os.path.isdir(request.include_path):
        raise LmEvalError(f"--include_path '{request.include_path}': no such directory")
    for flag, value, least in (("batch_size", request.batch_size, 1), ("limit", request.limit, 1)):
        if value is not None and value < least:
            raise LmEvalError(f"--{flag} {value}: expected >= {least}")
    from lm_eval import simple_evaluate

    task_manager = task_manager_for(request.tasks, request.include_path)
    tasks = resolve_tasks(request.tasks, task_manager)
    register()
    return simple_evaluate(
        model=MODEL_NAME,
        model_args={"path": request.model},
        tasks=tasks,
        num_fewshot=request.num_fewshot,
        batch_size=request.batch_size,
        device=request.device,
        limit=request.limit,
        bootstrap_iters=request.bootstrap_iters,
        log_samples=request.log_samples,
        task_manager=task_manager,
    )


def save_lm_eval(results: dict[str, Any], output_path: str) -> str:
    """Write the results as JSON: to output_path if it names a .json file, else into that directory as
    lm_eval_results.json; an existing file is never overwritten (the new one gets a timestamp). Returns the path."""
    from lm_eval.utils import handle_non_serializable

    directory, name = (
        (os.path.dirname(output_path) or ".", os.path.basename(output_path))
        if output_path.endswith(".json")
        else (output_path, "lm_eval_results.json")
    )
    os.makedirs(directory, exist_ok=True)
    path = unique_path(directory, name)
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=handle_non_serializable)
    return path
