"""Fault injection for the resilience tests, hooked onto a built Trainer from outside its step and save.

Run as the training entry point under a launcher, in place of launcher/train.py:

    deepspeed --module tests.integration.workers.faults --nan-loss 3:1 --kill-during-save 8:1 [train flags ...]

--nan-loss ATTEMPT:RANK  that rank's loss is multiplied by NaN in every micro-batch of that attempt (0-based,
                         skipped attempts count), so DeepSpeed finds a non-finite gradient and skips the step
--kill-during-save STEP:RANK  that rank SIGKILLs itself once its files of step STEP's checkpoint are written,
                              before the save commits
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass, field


def _pairs(text: str) -> tuple[int, int]:
    a, b = text.split(":")
    return int(a), int(b)


@dataclass
class Faults:
    nan_loss: list[tuple[int, int]] = field(default_factory=list)  # (attempt, rank)
    kill_during_save: list[tuple[int, int]] = field(default_factory=list)  # (step, rank)

    @classmethod
    def parse(cls, argv: list[str]) -> tuple[Faults, list[str]]:
        p = argparse.ArgumentParser(add_help=False)
        p.add_argument("--nan-loss", type=_pairs, action="append", default=[])
        p.add_argument("--kill-during-save", type=_pairs, action="append", default=[])
        known, rest = p.parse_known_args(argv)
        return cls(known.nan_loss, known.kill_during_save), rest

    def install(self, trainer) -> None:
        rank = trainer.env.rank
        nan_attempts = {attempt for attempt, r in self.nan_loss if r == rank}
        kill_steps = {step for step, r in self.kill_during_save if r == rank}
        if nan_attempts:

            def poison(module, args, output):
                # engine.global_steps counts attempts, skipped ones included: during attempt a it is a
                if module.training and int(trainer.engine.global_steps) in nan_attempts:
                    logits, loss = output
                    return logits, loss * float("nan")
                return output

            trainer.model.register_forward_hook(poison)
        if kill_steps:
            save_checkpoint = trainer.engine.save_checkpoint

            def save_then_die(*args, **kwargs):
                result = save_checkpoint(*args, **kwargs)
                if trainer.step in kill_steps:
                    os.kill(os.getpid(), signal.SIGKILL)
                return result

            trainer.engine.save_checkpoint = save_then_die


def main(argv: list[str]) -> int:
    from pascal_dist.cli import parse, reporting_user_errors, train_command

    faults, rest = Faults.parse(argv)
    return reporting_user_errors(lambda: train_command(parse(["train", *rest]), before_training=faults.install))


if __name__ == "__main__":
    from pascal_dist.cli import run_rank

    run_rank(main, sys.argv[1:])
