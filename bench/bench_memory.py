"""Activation memory of one training step per attention backend, counted without a GPU, as a Markdown table.

The model runs forward and backward on fake tensors (shapes, dtypes and allocations, no data: the reference model at
batch 64 takes a second) while torch's MemTracker follows every allocation. What it counts is what the eager
program allocates on any device; torch.compile usually saves some of it, and kernel workspaces are not seen.
The ZeRO-2 engine adds its optimizer states on top (fp32 master, Adam moments, fp32 gradient partition,
bucket buffers): about 20 bytes per parameter, in the last column. Dropout is counted as a GPU runs it: a
1-byte mask per dropout (a CPU's F.dropout keeps a noise tensor of the activation's dtype, twice that). SDPA
picks its kernel by device: with attention dropout on, on a CPU it takes the math path (T x T probabilities and
mask per layer), on a GPU flash, so `none`, `sdpa` and `banded` rows with dropout count more than a GPU
allocates; `fused` and `reference` run the same code everywhere.

The compiled columns are what torch.compile's partitioner (inductor's settings) keeps for backward at each
activation memory budget (train.activation_memory_budget): the model is traced, not run, as one graph
(train.compile_scope=model), and the forward graph's saved tensors are summed. Add the parameters, the ZeRO-2
states and a layer's backward temporaries for a peak. Block by block (the default scope) the partitioner decides
per block; bench/bench_step.py's peak column measures that on a GPU.

    python bench/bench_memory.py                     # reference model, T=256 x batch 64, bf16
    python bench/bench_memory.py --block-size 1024 --batch 16
    python bench/bench_memory.py --budgets 1,0.9,0.5 # compiled columns at these memory budgets ("" for none)
"""

from __future__ import annotations

import argparse
import functools
import os
from unittest import mock

import torch
import torch.nn.functional as F
from shapes import SPEC, add_shape_args, model_config
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from pascal_dist.model import PascalGPT

ZERO2_BYTES_PER_PARAM = 4 + 8 + 4 + 2 + 2  # fp32 master, Adam m and v, fp32 gradient partition, bf16 param + bucket


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="none,banded,fused,sdpa,reference")
    p.add_argument("--dropouts", default="0,0.1")
    p.add_argument("--budgets", default="1,0.9", help="activation memory budgets of the compiled columns")
    add_shape_args(p, SPEC)
    return p.parse_args()


def gpu_dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """F.dropout as it runs on a GPU: native_dropout, which saves a bool mask for backward."""
    return torch.native_dropout(x, p, True)[0] if training and p > 0 else x


def bf16_model(cfg) -> PascalGPT:
    torch.set_default_dtype(torch.bfloat16)
    try:
        return PascalGPT(cfg)
    finally:
        torch.set_default_dtype(torch.float32)


def peak_gib(a: argparse.Namespace, backend: str, dropout: float) -> tuple[float, float, int]:
    """(peak GiB of the step, of which activations and temporaries, parameter count) in bf16."""
    cfg = model_config(a, backend, dropout)
    with FakeTensorMode(), mock.patch.object(F, "dropout", gpu_dropout):
        model = bf16_model(cfg)
        x = torch.randint(0, cfg.vocab_size, (a.batch, a.block_size))
        tracker = MemTracker()
        tracker.track_external(model, x)
        with tracker:
            _, loss = model(x, x)
            loss.backward()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    by_kind = {str(k).rsplit(".", 1)[-1]: v / 2**30 for k, v in peak.items()}
    return by_kind["Total"], by_kind.get("ACT", 0.0) + by_kind.get("TEMP", 0.0), model.num_params()


def compiled_saved_gib(a: argparse.Namespace, backend: str, dropout: float, budget: float) -> float:
    """GiB that the compiled training step keeps for backward at activation memory budget `budget`."""
    import torch._functorch.config as functorch_config
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    cfg = model_config(a, backend, dropout)
    model = bf16_model(cfg)  # real weights: dynamo traces real inputs (on fake copies; nothing runs)
    saved: list[torch.Tensor] = []

    def forward_compiler(gm: torch.fx.GraphModule, example_inputs) -> None:
        inputs = {n for n in gm.graph.nodes if n.op == "placeholder"}  # weights and tokens: not activations
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]  # the loss, then what backward keeps
        saved.extend(
            n.meta["val"]
            for n in outputs
            if isinstance(n, torch.fx.Node) and n not in inputs and isinstance(n.meta.get("val"), torch.Tensor)
        )
        raise _Traced

    def backend_fn(gm, example_inputs):
        return aot_module_simplified(
            gm,
            example_inputs,
            fw_compiler=forward_compiler,
            bw_compiler=forward_compiler,
            partition_fn=functools.partial(min_cut_rematerialization_partition, compiler="inductor"),
            decompositions=select_decomp_table(),
        )

    x = torch.randint(0, cfg.vocab_size, (a.batch, a.block_size))
    torch._dynamo.reset()
    # torch's own patch: mock.patch.object's undo deletes a torch config entry in torch 2.11
    with functorch_config.patch(activation_memory_budget=budget):
        try:
            torch.compile(model, backend=backend_fn, fullgraph=True)(x, x)
        except Exception:  # dynamo wraps _Traced; anything else left `saved` empty and is raised below
            if not saved:
                raise
    return sum(t.numel() * t.element_size() for t in saved) / 2**30


class _Traced(Exception):
    """Raised once the forward graph is partitioned: what it saves is known, and nothing needs to run."""


def main() -> None:
    a = parse()
    # No kernel runs on fake tensors (the fused op's registered fake stands in), so `fused` needs no GPU here.
    os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
    print(
        f"\nL={a.n_layer} d={a.n_embd} h={a.n_head} T={a.block_size} B={a.batch} V={a.vocab}, bf16; eager on fake "
        "tensors, compiled traced\n"
    )
    budgets = [float(b) for b in a.budgets.split(",") if b]
    compiled_heads = "".join(f" compiled, saved GiB at budget {b:g} |" for b in budgets)
    print(
        f"| backend | dropout | step peak GiB | of which activations | ratio vs none | + ZeRO-2 states GiB |"
        f"{compiled_heads}\n|---|---|---|---|---|---|" + "---|" * len(budgets)
    )
    names = a.backends.split(",")
    for dropout in map(float, a.dropouts.split(",")):
        rows = {name: peak_gib(a, name, dropout) for name in names}
        base = rows.get("none", rows[names[0]])[0]
        for name, (total, act, n_params) in rows.items():
            states = n_params * ZERO2_BYTES_PER_PARAM / 2**30
            compiled = "".join(f" {compiled_saved_gib(a, name, dropout, b):.2f} |" for b in budgets)
            print(
                f"| {name} | {dropout:g} | {total:.2f} | {act:.2f} | {total / base:.2f} | {total + states:.2f} |"
                f"{compiled}"
            )


if __name__ == "__main__":
    main()
