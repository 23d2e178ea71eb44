"""One process of a 2-rank run: four ZeRO engine steps of a tiny model with rank 1's theta gradient made infinite at
step 2 (the loss stays finite), then DeepSpeed's gradient norm against ours and the ops of a step with and without
the step patches (tests/integration/test_zero_step.py). argv: the ZeRO stage."""

import torch
from deepspeed.utils import safe_get_full_fp32_param

from bench.dispatch_count import DispatchCounter
from pascal_dist.config import load_ds_config
from pascal_dist.config.schema import ModelConfig, RunConfig, TrainConfig
from pascal_dist.model import PascalGPT
from pascal_dist.train.dist_env import detect
from pascal_dist.train.engine import build_engine, init_distributed
from pascal_dist.train.zero_step import restore_deepspeed_step
from tests.integration.workers import run_worker


def main(argv: list[str]) -> dict:
    stage = int(argv[0])
    env = detect()
    init_distributed(env)
    torch.manual_seed(0)
    model = PascalGPT(
        ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0, attn_dropout=0.0)
    )
    train = TrainConfig(micro_batch_size=2, grad_accum=1, grad_clip=1.0)
    ds = load_ds_config(f"configs/zero{stage}.json", RunConfig(train=train), world_size=2)
    if stage == 3:  # partition every parameter, even this model's small ones: the tied head's weight is gathered too
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    engine, optimizer, _ = build_engine(model, train, ds)
    theta = model.bias.theta
    poison = {"on": False}
    theta.register_hook(lambda g: g * float("inf") if poison["on"] else g)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(env.rank))

    def step():
        _, loss = engine(x, x)
        engine.backward(loss)
        engine.step()
        return float(loss)

    history = []
    for k in range(4):
        poison["on"] = k == 2 and env.rank == 1
        loss = step()
        history.append(
            {
                "loss": loss,
                "theta": float(safe_get_full_fp32_param(theta).reshape(-1)[0]),
                "skipped": int(engine.skipped_steps),
            }
        )
    _, loss = engine(x, x)
    engine.backward(loss)

    def global_norm():
        if stage == 3:
            return float(torch.stack([n.double() for n in optimizer._get_norm_groups()]).square().sum().sqrt())
        return float(optimizer.scaled_global_norm())

    norms = {}
    ours = vars(optimizer).pop("get_grad_norm_direct")  # DeepSpeed's norm of these gradients, then ours
    with DispatchCounter() as c:
        norms["deepspeed"] = global_norm()
    norms["deepspeed_ops"] = c.launches
    optimizer.get_grad_norm_direct = ours
    with DispatchCounter() as c:
        norms["foreach"] = global_norm()
    norms["foreach_ops"] = c.launches
    groups = optimizer.fp16_groups if stage == 3 else optimizer.params_in_partition
    norms["tensors"], norms["groups"] = sum(len(g) for g in groups), len(groups)
    engine.step()
    counts = {}
    with DispatchCounter() as c:
        step()
    counts["with"] = c.launches
    assert restore_deepspeed_step(optimizer)  # count the same step with DeepSpeed's own scan and norm
    with DispatchCounter() as c:
        step()
    counts["without"] = c.launches
    engine.destroy()
    return {"history": history, "counts": counts, "norms": norms}


if __name__ == "__main__":
    run_worker(main)
