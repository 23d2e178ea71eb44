"""Three steps of the real training loop, counting the host waits of each whole step and of DeepSpeed's optimizer
step inside it (tests/integration/test_train_distributed.py). argv: data_dir run_dir [key=value ...]."""

from bench.dispatch_count import DispatchCounter
from pascal_dist.config import load_config
from pascal_dist.train.dist_env import detect
from pascal_dist.train.trainer import Trainer
from tests.integration.workers import run_worker


def main(argv: list[str]) -> dict:
    data_dir, run_dir, overrides = argv[0], argv[1], argv[2:]
    cfg = load_config(None, overrides + [f"data.dir={data_dir}", f"train.run_dir={run_dir}", "train.compile=false"])
    trainer = Trainer(cfg, "configs/zero2.json", detect())
    inside_engine = []
    engine_step = trainer.engine.step

    def counted_engine_step(*args, **kwargs):
        with DispatchCounter() as c:
            engine_step(*args, **kwargs)
        inside_engine.append(c.host_waits)

    trainer.engine.step = counted_engine_step
    whole = []
    for _ in range(3):
        with DispatchCounter() as c:
            trainer._one_step()
            trainer._check_stop()
        whole.append(c.host_waits)
    trainer.close()
    return {"whole": whole, "inside_engine": inside_engine}


if __name__ == "__main__":
    run_worker(main)
