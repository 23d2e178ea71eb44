"""The training loop: data -> model -> ZeRO engine -> metrics and checkpoints, with the bias-warmup counter.

The bias-warmup counter t is the number of optimizer updates applied (`engine.global_steps` minus the steps
DeepSpeed skipped for a non-finite gradient). The loop writes it into the model after every optimizer step
(and at start and resume); nothing in forward advances it. So the micro-batches of update k+1 run at t = k,
and everything done between steps (evaluation, samples, the logged alpha, the checkpoint) sees t = k after k
updates, on every rank, whatever the gradient accumulation, skipped steps or resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from pascal_dist.attention import dense_mask_bytes, fused_unavailable_reason, get_backend, runnable_backend
from pascal_dist.config import ConfigError, load_ds_config, to_yaml
from pascal_dist.config.schema import RunConfig
from pascal_dist.data import DataError, TrainLoader, read_manifest, val_batches
from pascal_dist.data.shards import verify_data_dir
from pascal_dist.model import PascalGPT
from pascal_dist.model.bias import alpha as bias_alpha
from pascal_dist.train import zero_step
from pascal_dist.train.checkpoint import Checkpointer, CheckpointError, Identity, list_tags
from pascal_dist.train.dist_env import DistEnv
from pascal_dist.train.engine import build_engine, compile_engine, init_distributed, require_deepspeed
from pascal_dist.train.metrics import MetricsWriter, StepTimer, memory_gib
from pascal_dist.train.preemption import (
    EXIT_NUMERICAL,
    EXIT_PREEMPTED,
    NONE,
    SIGNALLED,
    SlowestStep,
    StopTraining,
    StopVote,
    StopWatch,
)

# Each rank reseeds after building the model (identical weights everywhere) at seed + RANK_SEED_STRIDE * (rank + 1),
# so dropout masks differ across ranks; the stride keeps those seeds apart from the run seeds next to seed.
RANK_SEED_STRIDE = 1000
# The logged val/ppl is exp(min(loss, cap)): exp(50) ~ 5e21 still fits a TensorBoard scalar's float32 (exp(89)
# would be inf); a loss that high means the run diverged, and val/loss shows by how much.
TB_PPL_CAP_NATS = 50.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_writable(run_dir: str) -> None:
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write-probe-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"train.run_dir '{run_dir}' is not writable: {e.strerror}") from None


class Trainer:
    """Owns one run. `train()` runs it to `train.max_steps`; `close()` releases writers and the process group."""

    def __init__(self, cfg: RunConfig, ds_config_path: str, env: DistEnv, resume: str = "never"):
        self.cfg, self.env = cfg, env
        t = cfg.train
        if runnable_backend(cfg.model.attention.backend) != cfg.model.attention.backend:
            raise ConfigError(
                f"model.attention.backend '{cfg.model.attention.backend}' "
                f"{fused_unavailable_reason()}; 'banded' computes the same function anywhere"
            )
        self.run_dir = t.run_dir
        require_deepspeed()
        ds_config = load_ds_config(ds_config_path, cfg, env.world_size)
        _check_writable(self.run_dir)
        ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        if resume == "never" and list_tags(ckpt_dir):
            raise ConfigError(
                f"train.run_dir '{self.run_dir}' already holds checkpoints; pass --resume auto to "
                "continue that run, or choose another train.run_dir"
            )
        self.stopwatch = StopWatch(t.time_limit_s)  # before the slow start-up: a signal then still counts

        init_distributed(env)
        self.device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.stop_vote = StopVote(self.device)
        self._together(self._check_attention_memory)
        if cfg.data.verify:
            self._together(lambda: self._verify_data() if env.is_main else None)
        self.loader = self._together(
            lambda: TrainLoader(
                cfg.data.dir,
                cfg.data.train_split,
                cfg.model.block_size,
                t.micro_batch_size,
                t.grad_accum,
                env.rank,
                env.world_size,
                t.seed,
                self.device,
                expected_vocab_size=cfg.model.vocab_size,
            )
        )
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(os.path.join(cfg.data.dir, "tokenizer.json"))
        identity = Identity(dataclasses.asdict(cfg.model), read_manifest(cfg.data.dir)["tokenizer"].get("sha256"))
        self.ckpt = Checkpointer(ckpt_dir, env.rank, env.world_size, cfg.checkpoint.keep_last, identity, self._log)
        plan = None if resume == "never" else self.ckpt.choose(None if resume == "auto" else resume)
        if plan is not None and plan["world_size"] != env.world_size:
            # DeepSpeed reshards the ZeRO state on load; the user's other checkpoint settings stay
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}

        seed_everything(t.seed)  # identical initial weights on every rank
        self.model = PascalGPT(cfg.model)
        self.n_params = self.model.num_params()  # before ZeRO-3 partitions the parameters away
        self.engine, self.optimizer, self.scheduler = build_engine(self.model, t, ds_config)
        if (untested := zero_step.untested_deepspeed()) is not None:
            self._log(f"note: {untested}")
        seed_everything(t.seed + RANK_SEED_STRIDE * (env.rank + 1))  # independent dropout masks per rank
        self.compiled = t.compile if t.compile is not None else torch.cuda.is_available()
        if self.compiled:
            compile_engine(self.engine, t.activation_memory_budget, t.compile_scope)

        self.metrics = MetricsWriter(
            os.path.join(self.run_dir, "tensorboard"), enabled=env.is_main and cfg.logging.tensorboard
        )
        if env.is_main:
            with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
                f.write(to_yaml(cfg))
            with open(os.path.join(self.run_dir, "ds_config.json"), "w") as f:
                json.dump(ds_config, f, indent=2)
        self.metrics.text("config", to_yaml(cfg))
        self.metrics.text("ds_config", json.dumps(ds_config, indent=2))

        self.last_val_loss: Optional[float] = None
        self._saved: Optional[tuple[int, str]] = None  # (engine.global_steps, tag) of the last save
        self.slowest_step, self.save_s = SlowestStep(), 0.0
        if plan is not None:
            self._resume(plan)
        self._log(
            f"model {self.n_params / 1e6:.2f}M parameters, global batch {self.loader.global_batch_size} x "
            f"{cfg.model.block_size} tokens, world {env.world_size}, ZeRO stage "
            f"{self.engine.zero_optimization_stage()}, "
            f"{f'compiled ({t.compile_scope})' if self.compiled else 'eager'}, step {self.step}"
        )

    def _together(self, build):
        """Run `build` on every rank; if any rank fails, every rank raises instead of waiting for it forever."""
        error = None
        try:
            result = build()
        except (ConfigError, DataError) as e:
            error, result = e, None
        failed = torch.tensor([0 if error is None else 1 + self.env.rank], dtype=torch.int64, device=self.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item():
            # Every rank is here, so leaving the group cleanly cannot hang; exiting with it alive can abort a peer.
            dist.barrier()
            dist.destroy_process_group()
            raise error or DataError(
                f"rank {failed.item() - 1} could not open the data (its error is in the job output)"
            )
        return result

    def _check_attention_memory(self) -> None:
        """Refuse, in one line, a block_size whose dense (T, T) attention mask cannot be allocated here, rather than
        fail in the first forward with an allocator traceback."""
        m = self.cfg.model
        backend = get_backend(m.attention.backend, m.attention.kernels)
        if not backend.builds_dense_mask(m.attn_dropout):
            return
        need = dense_mask_bytes(m.block_size)
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            import psutil

            free = psutil.virtual_memory().available
        if need > free:
            raise ConfigError(
                f"model.block_size={m.block_size}: attention backend '{m.attention.backend}'"
                f"{' with attn_dropout > 0' if m.attention.backend == 'banded' else ''} builds a "
                f"{m.block_size} x {m.block_size} mask ({need / 2**30:.1f} GiB) and {free / 2**30:.1f} GiB are "
                f"free here; use model.attention.backend=banded with model.attn_dropout=0 (O(T) memory), fused on a "
                "GPU, or a smaller model.block_size"
            )

    def _verify_data(self) -> None:
        start = time.monotonic()
        totals = verify_data_dir(self.cfg.data.dir)
        self._log(
            f"data.verify: {totals['shards']} shards, {totals['bytes'] / 1e9:.3f} GB match the manifest "
            f"({time.monotonic() - start:.1f} s)"
        )

    # --- the counter -------------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Optimizer updates applied so far: the bias-warmup counter t."""
        return int(self.engine.global_steps) - int(self.engine.skipped_steps)

    def _gathered_sync_state(self) -> list[dict]:
        """Every rank's trainer step, model counter (the buffer the bias reads) and theta; collective.

        Raises if the ranks disagree or if a rank's model holds another counter than its trainer's step.
        """
        mine = torch.tensor(
            [float(self.step), float(self.model.bias_step), self._theta()], dtype=torch.float64, device=self.device
        )
        everyone = [torch.zeros_like(mine) for _ in range(self.env.world_size)]
        dist.all_gather(everyone, mine)
        rows = [{"step": int(r[0]), "bias_step": int(r[1]), "theta": float(r[2])} for r in everyone]
        if any(r != rows[0] for r in rows) or rows[0]["bias_step"] != rows[0]["step"]:
            raise RuntimeError(f"ranks disagree on (optimizer step, model's bias-warmup counter, theta): {rows}")
        return rows

    def _model_alpha(self) -> float:
        """alpha(t) at the counter the model holds (what evaluation and the next checkpoint use)."""
        return float(bias_alpha(self.model.bias_step, self.cfg.model.bias.warmup_steps))

    def _bias_parameter(self, name: str) -> list[float] | None:
        """A parameter of the bias module (theta, or the learned band) from the fp32 master copy (the bf16 model
        copy rounds away small updates); None when the bias has no such parameter. Collective under ZeRO-3."""
        from deepspeed.utils import safe_get_full_fp32_param

        param = getattr(self.model.bias, name, None)
        if param is None:
            return None
        master = safe_get_full_fp32_param(param)
        return (master if master is not None else param).detach().float().reshape(-1).tolist()

    def _theta(self) -> float:
        """theta; 0.0 where the bias has none (`none`, the learned band)."""
        theta = self._bias_parameter("theta")
        return theta[0] if theta else 0.0

    # --- the loop ----------------------------------------------------------------------------------------
    def train(self) -> None:
        t, lg = self.cfg.train, self.cfg.logging
        timer, window_loss, window_steps, window_time = StepTimer(), None, 0, 0.0
        tokens_per_step = self.loader.global_batch_size * self.cfg.model.block_size
        bad_in_a_row = 0
        while self.step < t.max_steps:
            before = self.step
            step_loss = self._one_step()
            ends_window = self.step % lg.log_interval == 0 or self.step == t.max_steps
            elapsed = timer.lap(sync=ends_window)  # the logged throughput is exact; no other step waits
            if self.step == before:  # DeepSpeed found a non-finite gradient on some rank: skipped everywhere
                bad_in_a_row += 1
                self.metrics.scalars({"train/skipped_steps": float(self.engine.skipped_steps)}, self.step)
                self._log(
                    f"warning: step {self.step + 1} skipped (non-finite loss or gradient), "
                    f"{bad_in_a_row} in a row, {self.engine.skipped_steps} in total"
                )
                if bad_in_a_row >= t.max_bad_steps:
                    tag = self.save()  # parameters are those of the last good step: skipped steps changed nothing
                    raise StopTraining(
                        f"{bad_in_a_row} consecutive steps had a non-finite loss or gradient; "
                        f"last good state saved as {tag}",
                        EXIT_NUMERICAL,
                    )
                self._check_stop()
                continue
            bad_in_a_row = 0
            self.slowest_step.add(elapsed)
            window_loss = step_loss if window_loss is None else window_loss + step_loss
            window_steps, window_time = window_steps + 1, window_time + elapsed
            step = self.step
            paused = False
            if ends_window:
                self._write_train_metrics(
                    step,
                    self._mean_over_ranks(window_loss / window_steps),
                    window_time / window_steps,
                    tokens_per_step * window_steps / window_time,
                )
                window_loss, window_steps, window_time, paused = None, 0, 0.0, True
            if step % t.eval_interval == 0 or step == t.max_steps:
                self.last_val_loss, paused = self.evaluate(step), True
            if (self.cfg.checkpoint.interval and step % self.cfg.checkpoint.interval == 0) or step == t.max_steps:
                self.save()
                paused = True
            if paused:
                timer.lap(sync=True)  # logging, evaluation and saving are not part of the step time
            if step < t.max_steps:
                self._check_stop()

    def _one_step(self) -> torch.Tensor:
        """Forward/backward over the micro-batches and the optimizer step; returns this rank's mean loss.

        The loss stays on the device (no host sync); it is reduced across ranks only when logged.
        """
        local = torch.zeros((), dtype=torch.float64, device=self.device)
        for _ in range(self.cfg.train.grad_accum):
            x, y = self.loader.next_batch()
            _, loss = self.engine(x, y)
            self.engine.backward(loss)
            self.engine.step()
            local += loss.detach().double()
        self.model.set_bias_step(self.step)  # unchanged if DeepSpeed skipped the update
        return local / self.cfg.train.grad_accum

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        value = value.detach().to(torch.float64).reshape(1).clone()
        dist.all_reduce(value)
        return float(value) / self.env.world_size

    def _check_stop(self) -> None:
        """Every rank agrees whether to stop (a signal on any rank, or the time limit), then stops together.

        The vote read here was cast one step ago (StopVote), so stopping takes one step longer than the signal
        and the time limit's margin (StopWatch.reason) covers that step.
        """
        reason = self.stop_vote.result()
        self.stop_vote.cast(self.stopwatch.reason(self.slowest_step.seconds, self.save_s))
        if reason == NONE:
            return
        self.stop_vote.result()  # settle the vote just cast before the save's own collectives
        tag = self.save()
        why = (
            f"signal {self.stopwatch.signal_name or 'on another rank'}"
            if reason == SIGNALLED
            else f"time limit of {self.cfg.train.time_limit_s:.0f} s"
        )
        raise StopTraining(
            f"stopped at step {self.step} by {why}; checkpoint {tag} saved, continue with --resume auto", EXIT_PREEMPTED
        )

    def _write_train_metrics(self, step: int, loss: float, step_time: float, tokens_per_s: float) -> None:
        rows = self._gathered_sync_state()
        theta = rows[0]["theta"]
        grad_norm = self.engine.get_global_grad_norm()
        values = {
            "train/loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "bias/alpha": self._model_alpha(),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": tokens_per_s,
            "step_time": step_time,
            "memory_gib": memory_gib(),
        }
        if getattr(self.model.bias, "theta", None) is not None:
            values.update({"bias/theta": theta, "bias/skip_penalty": math.exp(-math.exp(theta))})
        if (band := self._bias_parameter("band")) is not None:  # the learned control's diagonals
            values.update({f"bias/band_{d}": v for d, v in enumerate(band)})
        self.metrics.scalars(values, step)
        if self.env.is_main:
            with open(os.path.join(self.run_dir, "rank_sync.jsonl"), "a") as f:
                f.write(
                    json.dumps(
                        {"step": step, "ranks": rows, "lr": values["lr"], "alpha": values["bias/alpha"], "loss": loss}
                    )
                    + "\n"
                )
        self._log(
            f"step {step:6d} | loss {loss:.4f} | lr {values['lr']:.2e} | alpha {values['bias/alpha']:.3f} | "
            f"theta {theta:+.3f} | {tokens_per_s:,.0f} tok/s | {step_time * 1e3:.0f} ms"
        )

    @torch.no_grad()
    def evaluate(self, step: int) -> float:
        """Mean validation loss over all ranks' tokens (the same batches every time); logs loss and perplexity."""
        t = self.cfg.train
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for x, y in val_batches(
            self.cfg.data.dir,
            self.cfg.data.val_split,
            self.cfg.model.block_size,
            t.micro_batch_size,
            self.env.rank,
            self.env.world_size,
            t.eval_batches,
            self.device,
            expected_vocab_size=self.cfg.model.vocab_size,
        ):
            _, loss = self.engine(x, y)
            total[0] += loss.double() * y.numel()
            total[1] += y.numel()
        self.engine.train()
        dist.all_reduce(total)
        val_loss = float(total[0] / total[1])
        val_ppl = math.exp(min(val_loss, TB_PPL_CAP_NATS))
        self.metrics.scalars({"val/loss": val_loss, "val/ppl": val_ppl}, step)
        self._log_samples(step)
        self.metrics.flush()
        self._log(f"step {step:6d} | val loss {val_loss:.4f} | val ppl {val_ppl:.2f}")
        return val_loss

    def _log_samples(self, step: int) -> None:
        """Continue the fixed prompts with a fixed seed (its own generator: the training RNG is untouched).

        Every rank generates, because under ZeRO-3 each layer gathers its weights when called; rank 0 writes.
        """
        lg = self.cfg.logging
        if not lg.sample_prompts or lg.sample_tokens <= 0:
            return
        from pascal_dist.model.generate import sample_texts

        texts = sample_texts(self.model, self.tokenizer, lg.sample_prompts, lg.sample_tokens, seed=self.cfg.train.seed)
        for i, text in enumerate(texts):
            self.metrics.text(f"samples/{i}", text, step)

    # --- checkpoints -------------------------------------------------------------------------------------
    def save(self) -> str:
        """Collective checkpoint of the current state; a no-op if exactly this state was just saved (a stop
        request right after a periodic save), so a complete checkpoint is never rewritten."""
        if self._saved is not None and self._saved[0] == int(self.engine.global_steps):
            return self._saved[1]
        start = time.monotonic()
        state = {"loader": self.loader.state_dict(), "bias_step": self.step, "config": to_yaml(self.cfg)}
        tag = self.ckpt.save(self.engine, self.step, state, self.last_val_loss)
        self.save_s = max(self.save_s, time.monotonic() - start)
        self._saved = (int(self.engine.global_steps), tag)  # attempts, not updates: skipped steps move the loader
        self.metrics.flush()
        self._log(f"saved checkpoint {os.path.join(self.ckpt.dir, tag)}")
        return tag

    def _resume(self, plan: dict) -> None:
        tag = plan["tag"] if plan["world_size"] == self.env.world_size else self.ckpt.universal_tag(plan)
        state = self.ckpt.load(self.engine, tag)
        if state["bias_step"] != self.step:
            raise CheckpointError(f"{tag}: bias-warmup counter {state['bias_step']} != optimizer step {self.step}")
        self.loader.load_state_dict(state["loader"])
        self.model.set_bias_step(self.step)
        self._gathered_sync_state()
        self._log(
            f"resumed from {plan['tag']} at step {self.step}, {self.loader.samples_consumed} samples consumed"
            + (f" (world size {plan['world_size']} -> {self.env.world_size})" if tag != plan["tag"] else "")
        )

    def _log(self, msg: str) -> None:
        if self.env.is_main:
            print(f"[pascal-dist] {msg}", flush=True)

    def close(self, clean: bool = True) -> None:
        """Flush metrics and leave the process group; after a failure, do not wait for peers that may be gone."""
        self.metrics.close()
        if dist.is_initialized():
            if clean:
                self.stop_vote.result()  # the vote cast at the last step boundary, still in flight
                # A rank that destroys the group while a peer still has collectives in flight can abort the
                # peer at exit ("terminate called without an active exception"), so everyone arrives first.
                dist.barrier()
            dist.destroy_process_group()
