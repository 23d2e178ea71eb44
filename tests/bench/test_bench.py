"""The benchmark scripts still run and print their tables (tiny sizes; the numbers themselves are not checked,
except where a benchmark's own accounting is the thing under test)."""

import argparse
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, free_port

pytestmark = pytest.mark.slow


def run(script, *args):
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=REPO,
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    proc = subprocess.run(
        [sys.executable, f"bench/{script}", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]


TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "16", "--batch", "2"]


def test_bench_backends_table():
    rows = run(
        "bench_backends.py",
        *TINY,
        "--vocab",
        "64",
        "--steps",
        "1",
        "--rounds",
        "1",
        "--warmup",
        "1",
        "--backends",
        "none,sdpa,banded,banded:torch",
    )
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["none", "sdpa", "banded", "banded:torch"]


def test_bench_step_runs_the_shipped_configs_and_variants(tmp_path):
    rows = run(
        "bench_step.py",
        *TINY,
        "--steps",
        "1",
        "--warmup",
        "1",
        "--ds",
        "configs/zero2.json",
        "--ds",
        "configs/zero2.json:zero_optimization.overlap_comm=false",
        "--ds-own",
        "configs/zero2.json",
        "--profile",
        str(tmp_path),
    )
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.strip(" |").split("|")[1:]] for r in rows[1:]}
    assert list(cells) == [
        "plain PyTorch",
        "DeepSpeed configs/zero2.json",
        "DeepSpeed configs/zero2.json:zero_optimization.overlap_comm=false",
        "DeepSpeed configs/zero2.json, DeepSpeed's own step",
    ]
    ops = {name: int(c[-2].replace(",", "")) for name, c in cells.items()}
    waits = {name: int(c[-1]) for name, c in cells.items()}
    assert all(float(c[-3]) >= 0 for c in cells.values())  # the first (compiling) step, timed apart
    assert waits["plain PyTorch"] == 0
    assert ops["DeepSpeed configs/zero2.json, DeepSpeed's own step"] > ops["DeepSpeed configs/zero2.json"]
    assert len(list(tmp_path.glob("*.txt"))) == 4 and len(list(tmp_path.glob("*.trace.json"))) == 4


def test_bench_step_compiles_each_scope_side_by_side():
    """--compile-scope model,blocks: a plain-loop row per scope, the engine rows compiled as the first."""
    rows = run(
        "bench_step.py",
        *TINY,
        "--steps",
        "1",
        "--warmup",
        "1",
        "--compile",
        "--compile-scope",
        "model,blocks",
        "--ds",
        "configs/zero2.json",
    )
    assert [r.split("|")[1].strip() for r in rows[1:]] == [
        "plain PyTorch (compiled model)",
        "plain PyTorch (compiled blocks)",
        "DeepSpeed configs/zero2.json",
    ]


@pytest.mark.parametrize("scopes", ["layers", "blocks,blocks", "blocks,model,blocks"])
def test_bench_step_refuses_unknown_or_repeated_scopes(monkeypatch, capsys, scopes):
    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
    import bench_step

    monkeypatch.setattr(sys, "argv", ["bench_step.py", "--compile-scope", scopes])
    with pytest.raises(SystemExit):
        bench_step.parse()
    assert f"--compile-scope: one or two of blocks, model, got '{scopes}'" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["bench_step.py", "--compile-scope", "blocks,model"])  # without --compile
    with pytest.raises(SystemExit):
        bench_step.parse()
    assert "a second scope compares compiled rows; add --compile" in capsys.readouterr().err


def gpu_plan(stages: str, out: str) -> list[tuple[str, int, str]]:
    """(stage, time limit s, command) of `GPU_STAGES=stages bash bench/gpu.sh`, from its dry run."""
    env = dict(os.environ, GPU_DRY_RUN="1", GPU_STAGES=stages, OUT=out)
    proc = subprocess.run(["bash", "bench/gpu.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [
        (name, int(limit), command)
        for name, limit, command in (line.split(" ", 2) for line in proc.stdout.splitlines())
    ]


def test_gpu_script_fits_the_targets_in_one_device_call(tmp_path):
    """The targets' call (bench/gpu.sh's header) fits in one 10-minute device call by its stages' limits, with
    time for installing the wheels and for one stage's 10-second kill grace; every stage's script exists; a dry run
    writes nothing; an unknown stage is refused before any runs."""
    out = str(tmp_path / "out")
    plan = gpu_plan("step,dropout,backends,numerics", out)
    assert [name for name, _, _ in plan] == ["step", "step-dropout", "backends-T256", "backends-T1024", "numerics"]
    assert sum(limit for _, limit, _ in plan) <= 600 - 30 - 10
    everything = gpu_plan("step,dropout,backends,numerics,scope,budget,tests,attention", out)
    assert not os.path.exists(out)
    for _, _, command in everything:
        script = command.split()[1] if command.startswith("python3 bench/") else None
        assert script is None or os.path.isfile(os.path.join(REPO, script)), command
    proc = subprocess.run(
        ["bash", "bench/gpu.sh"],
        cwd=REPO,
        env=dict(os.environ, GPU_STAGES="step,speed"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "GPU_STAGES: unknown stage 'speed'" in proc.stdout


def test_bench_step_projects_the_spec_recipe_from_the_step_time(monkeypatch):
    """The projected reference-recipe time: 20,000 optimizer steps x 2 micro-batches at the measured step time."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
    import bench_step

    line = bench_step.projected_recipe([("plain", {"seconds": 0.025}), ("ZeRO-2", {"seconds": 0.0275})])
    assert "plain 17 min; ZeRO-2 18 min" in line and "20,000 optimizer steps x 2" in line


def test_check_numerics_passes_on_cpu():
    from tests.helpers import FUSED_INTERPRETER_FROM, triton_cannot_run

    fused_runs = triton_cannot_run(FUSED_INTERPRETER_FROM) is None or os.environ.get("CI") == "true"
    backends = ["sdpa", "reference", "banded"] + (["fused"] if fused_runs else [])
    rows = run("check_numerics.py", "--shapes", "17x16,40x8", "--backends", ",".join(backends))
    assert len(rows) == 1 + 2 * len(backends) and all(r.rstrip(" |").endswith("PASS") for r in rows[1:])


def test_compile_kernels_reports_registers_and_spills():
    """The kernels compile for sm_90 on a machine without a GPU (Triton's bundled ptxas) and the shipped fwd tiles
    neither spill nor miss wgmma."""
    pytest.importorskip("triton")
    rows = run("compile_kernels.py", "--kernels", "fwd", "--head-dims", "64")
    assert len(rows) == 3, rows  # header + dropout off/on
    for row in rows[1:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == "fused fwd" and cells[7] == "0" and cells[9] == "wgmma", row


def test_bench_attention_times_backends_and_checks_every_tile_candidate():
    """Every fused tile candidate computes what the shipped tiles compute (ragged T, dropout on and off), so a GPU
    session's tile sweep times only correct kernels; and the backend table has a row per backend and dropout."""
    from tests.helpers import FUSED_INTERPRETER_FROM, require_triton

    require_triton(interpreter_from=FUSED_INTERPRETER_FROM)
    rows = run(
        "bench_attention.py",
        "--shapes",
        "1x2x130x16",
        "--dtype",
        "float16",
        "--reps",
        "1",
        "--rounds",
        "1",
        "--backends",
        "none,banded,fused",
        "--tiles",
    )
    backend_rows = [r for r in rows if r.count("|") == 7 and "backend" not in r]
    assert [c.split("|")[3].strip() for c in backend_rows] == ["none", "banded", "fused"] * 2
    tile_rows = [r for r in rows if r.split("|")[1].strip() in ("fwd", "dq", "dkdv")]
    import pascal_dist.attention.fused as fa

    assert len(tile_rows) == 2 * sum(len(c) for c in fa.TILE_CANDIDATES.values())
    assert all(r.rstrip(" |").endswith("ok") for r in tile_rows), [r for r in tile_rows if "WRONG" in r]


def test_bench_memory_counts_the_fused_output_layout():
    """Fake tensors, no GPU: `fused` keeps no more activations than unbiased flash SDPA (its output is laid out
    for the output projection, so no copy of it is kept), and the dense reference keeps more (T x T per layer)."""
    rows = run(
        "bench_memory.py",
        "--n-layer",
        "2",
        "--n-embd",
        "64",
        "--n-head",
        "2",
        "--block-size",
        "128",
        "--batch",
        "8",
        "--vocab",
        "64",
        "--backends",
        "none,fused,reference",
        "--dropouts",
        "0",
    )
    ratio = {r.split("|")[1].strip(): float(r.split("|")[5]) for r in rows[1:]}
    assert ratio["none"] == 1.0 and ratio["fused"] <= 1.0 < ratio["reference"], ratio


def test_bench_memory_counts_dropout_as_a_gpu_keeps_it(monkeypatch):
    """Dropout adds exactly its 1-byte masks (residual and MLP dropouts; the fused attention keeps none), as a GPU's
    native dropout saves them, not the CPU's dtype-sized noise tensors."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
    import bench_memory

    a = argparse.Namespace(n_layer=2, n_embd=64, n_head=2, block_size=128, batch=8, vocab=64)
    extra = (bench_memory.peak_gib(a, "fused", 0.1)[0] - bench_memory.peak_gib(a, "fused", 0.0)[0]) * 2**30
    masks = (6 * a.n_layer + 1) * a.batch * a.block_size * a.n_embd  # per layer d + 4d + d bytes; the embedding's
    assert extra == pytest.approx(masks, rel=1e-9)


def test_bench_memory_compiled_columns_follow_the_memory_budget(monkeypatch):
    """The compiled columns come from torch.compile's partitioner: a lower activation memory budget saves less
    (recomputing pointwise ops), and at torch's default it saves about what eager keeps."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
    import bench_memory

    a = argparse.Namespace(n_layer=2, n_embd=64, n_head=2, block_size=128, batch=8, vocab=64)
    default, lean = (bench_memory.compiled_saved_gib(a, "fused", 0.1, b) for b in (1.0, 0.9))
    eager = bench_memory.peak_gib(a, "fused", 0.1)[1]
    assert lean < 0.9 * default and 0.5 * eager < default < 1.5 * eager, (lean, default, eager)


def test_bench_loader_times_the_id_check_and_verify_side_by_side(tiny_data):
    rows = run("bench_loader.py", "--data", tiny_data, "--batches", "8", "--verify-mb", "4")
    assert [r.split("|")[1].strip() for r in rows[1:]] == [
        "naive (Python loop per window)",
        "TrainLoader, no id check",
        "TrainLoader (vectorised memmap gather, ids < vocab checked)",
    ]
