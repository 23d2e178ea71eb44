"""A whole training run with a probe on the bias module: records (phase, t) of every call, the counter the attention
actually used, in training and in evaluation (tests/integration/test_train_distributed.py).
argv: data_dir run_dir [key=value ...]; `--nan-loss ATTEMPT:RANK` pairs inject non-finite losses (faults.py)."""

from pascal_dist.config import load_config
from pascal_dist.train.dist_env import detect
from pascal_dist.train.trainer import Trainer
from tests.integration.workers import run_worker
from tests.integration.workers.faults import Faults


def main(argv: list[str]) -> dict:
    faults, rest = Faults.parse(argv)
    data_dir, run_dir, overrides = rest[0], rest[1], rest[2:]
    cfg = load_config(None, overrides + [f"data.dir={data_dir}", f"train.run_dir={run_dir}"])
    trainer = Trainer(cfg, "configs/zero2.json", detect())
    faults.install(trainer)
    seen = []

    def probe(module, args, output):
        seen.append(("train" if trainer.model.training else "eval", int(args[0])))

    trainer.model.bias.register_forward_hook(probe)
    try:
        trainer.train()
    finally:
        trainer.close()
    return {"seen": seen}


if __name__ == "__main__":
    run_worker(main)
