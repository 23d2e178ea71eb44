"""Command line: `pascal-dist train|prepare ...`, and the argument handling behind launcher/*.py.

Bad input ends here as one line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import sys
from typing import Callable, NoReturn


def _parse_train_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launcher/train.py", description=__doc__,
                                epilog="Trailing key=value pairs override the config, e.g. train.max_steps=100")
    p.add_argument("--config", default=None, help="YAML run config (default: the SPEC recipe)")
    p.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", default="configs/zero2.json",
                   help="DeepSpeed JSON config (ZeRO stage, precision, communication)")
    p.add_argument("--resume", default="never",
                   help="'auto': continue from the latest checkpoint in train.run_dir if any; "
                        "'never' (default): refuse a run_dir that already has checkpoints; or a checkpoint tag")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_args(argv)


def train_main(argv: list[str]) -> int:
    from pascal_dist.preemption import StopTraining, install_handlers

    install_handlers()  # before the slow imports: a preemption signal during start-up must not kill the rank
    from pascal_dist.checkpoint import CheckpointError
    from pascal_dist.config import ConfigError, load_config
    from pascal_dist.data import DataError
    from pascal_dist.dist_env import detect

    args = _parse_train_args(argv)
    env = detect()
    trainer, clean = None, False
    try:
        cfg = load_config(args.config, args.overrides)
        from pascal_dist.trainer import Trainer  # heavy imports (deepspeed) only once the config is good

        trainer = Trainer(cfg, args.ds_config, env, resume=args.resume)
        trainer.train()
        clean = True
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
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


def prepare_main(argv: list[str]) -> int:
    from pascal_dist.data.prepare import main

    return main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": train_main, "prepare": prepare_main}
    if not argv or argv[0] not in commands:
        print("usage: pascal-dist {train,prepare} [args...]", file=sys.stderr)
        return 2
    if argv[0] == "train":
        run_rank(train_main, argv[1:])
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
