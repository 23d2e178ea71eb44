"""The real slurm/*.sh scripts on a real two-node Slurm cluster (tests/integration/slurm_cluster.py, slurm/cluster/).

The scripts are submitted unchanged, as users submit them: sbatch flags on the command line shrink the
8-GPU request to one CPU task per node, environment variables (CONFIG, DS_CONFIG, RUN_DIR, OVERRIDES,
PYTHON) and trailing key=value arguments pick a tiny model, and without CUDA the ranks use gloo. Checked:
the scripts parse and pass shellcheck, and their own requests fit an 8-GPU node; a 2-node job trains with
one rank on each node and writes TensorBoard events and checkpoints; the one-node script puts local ranks
0 and 1 on one node; a job signalled mid-run checkpoints, requeues itself and resumes to the same final
step; a cancelled job checkpoints but is not requeued; a bad request fails fast with the error in the
job's output on every rank; slurm/prepare_array.sh prepares one part of a corpus per node and its merge job writes
what one process writes. Each wait is bounded; the cluster fixture stops the daemons.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, read_scalars
from tests.helpers import TINY as HELPERS_TINY
from tests.integration.slurm_cluster import slurm_cluster, unavailable  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.slow

# tests/helpers.py's TINY (a 0.13M-parameter model on the vocab-512 `tiny_data`) without the step, evaluation and
# checkpoint counts: each test sets its own
TINY = [
    o
    for o in HELPERS_TINY
    if not o.startswith(("train.max_steps", "train.eval_interval", "train.eval_batches", "checkpoint.interval"))
]
# Two nodes, one task each, one CPU per task; --time well above the scripts' --signal=USR1@300 lead time
# (with less, Slurm would signal the job as soon as it starts).
TWO_NODES = ["-p", "debug", "--time=15", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"]


def submit(cluster, tmp_path, tiny_data, overrides, args=(), script="multinode", flags=TWO_NODES, **env):
    """slurm/<script>.sh with its output in tmp_path; returns (job id, run dir)."""
    run_dir = str(tmp_path / "run")
    env = dict(
        dict(
            PYTHON=sys.executable,
            OMP_NUM_THREADS="1",
            RUN_DIR=run_dir,
            DS_CONFIG="configs/zero2.json",
            OVERRIDES=" ".join(TINY + [f"data.dir={tiny_data}"] + overrides),
        ),
        **env,
    )
    job = cluster.sbatch(f"slurm/{script}.sh", flags + [f"--chdir={tmp_path}"], list(args), **env)
    return job, run_dir


def output(tmp_path, job, stream="out"):
    """The job's log as the script's --output/--error patterns name it (%x-%j), in the --chdir directory."""
    paths = list(tmp_path.glob(f"pascal-*-{job}.{stream}"))
    return paths[0].read_text(errors="replace") if paths else ""


def logs(tmp_path, job):
    return f"--- stdout\n{output(tmp_path, job)[-4000:]}\n--- stderr\n{output(tmp_path, job, 'err')[-3000:]}"


SCRIPTS = sorted(
    glob.glob(os.path.join(REPO, "slurm", "*.sh")) + glob.glob(os.path.join(REPO, "slurm", "cluster", "*.sh"))
)


def test_scripts_parse_and_pass_shellcheck():
    assert len(SCRIPTS) >= 6
    for path in SCRIPTS:
        proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
    if not shutil.which("shellcheck"):
        unavailable("shellcheck is not installed (apt-get install shellcheck)")
    # -x follows `source slurm/common.sh`, relative to the checkout.
    proc = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", ["a100x1", "a100x8", "multinode", "prepare_array"])
def test_unchanged_scripts_fit_a100_nodes(slurm_cluster, script):  # noqa: F811
    # The CI nodes look like 8-GPU A100 nodes (64 CPUs, 8 GPUs, 500 GB): each script's own #SBATCH request,
    # with no override, must be one the scheduler can place. --test-only schedules without running.
    ok = slurm_cluster.run("sbatch", "--test-only", f"slurm/{script}.sh")
    assert ok.returncode == 0 and "to start at" in ok.stdout, ok.stdout
    # ...and the check has teeth: a request beyond a node is refused.
    too_big = slurm_cluster.run("sbatch", "--test-only", "--cpus-per-task=65", f"slurm/{script}.sh")
    assert too_big.returncode != 0, too_big.stdout


def test_one_node_script_ranks_share_the_node(slurm_cluster, tiny_data, tmp_path):  # noqa: F811
    # a100x8.sh as on an 8-GPU node, shrunk to 2 tasks of 1 CPU: local ranks 0 and 1, both on one node.
    job, run_dir = submit(
        slurm_cluster,
        tmp_path,
        tiny_data,
        ["train.max_steps=4", "train.eval_interval=4", "train.eval_batches=1"],
        script="a100x8",
        flags=["-p", "debug", "--time=15", "--ntasks-per-node=2", "--cpus-per-task=1"],
    )
    info = slurm_cluster.wait(job, timeout=120)
    out = output(tmp_path, job)
    assert (info["JobState"], info["ExitCode"], info["NodeList"]) == ("COMPLETED", "0:0", "n1"), logs(tmp_path, job)
    assert re.search(r"rank 0/2 local_rank 0 on n1 -> master n1:\d+ \(srun\)", out), logs(tmp_path, job)
    assert re.search(r"rank 1/2 local_rank 1 on n1 -> master n1:\d+ \(srun\)", out), logs(tmp_path, job)
    assert latest_tag(run_dir) == "step00000004"


def synced_steps(run_dir):
    with open(os.path.join(run_dir, "rank_sync.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def latest_tag(run_dir):
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        return f.read().strip()


def test_two_node_job_one_rank_per_node(slurm_cluster, tiny_data, tmp_path):  # noqa: F811
    # OVERRIDES says 99 steps, the script's argument 12: arguments come last and win.
    job, run_dir = submit(
        slurm_cluster,
        tmp_path,
        tiny_data,
        ["train.max_steps=99", "train.eval_interval=6", "train.eval_batches=2", "checkpoint.interval=6"],
        args=["train.max_steps=12"],
    )
    info = slurm_cluster.wait(job, timeout=120)
    out = output(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), logs(tmp_path, job)
    assert info["NodeList"] == "n[1-2]" and info["NumNodes"] == "2"
    # Each rank reports what pascal_dist.train.dist_env made of srun's variables, and from which node.
    assert re.search(r"rank 0/2 local_rank 0 on n1 -> master n1:\d+ \(srun\)", out), logs(tmp_path, job)
    assert re.search(r"rank 1/2 local_rank 0 on n2 -> master n1:\d+ \(srun\)", out), logs(tmp_path, job)
    assert "world 2," in out, logs(tmp_path, job)
    assert synced_steps(run_dir) == list(range(1, 13))
    assert glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))
    assert [s for s, _ in read_scalars(run_dir, "train/loss")] == list(range(1, 13))
    assert latest_tag(run_dir) == "step00000012"
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints", "step00000012")))


def test_preemption_checkpoints_requeues_and_resumes(slurm_cluster, tiny_data, tmp_path):  # noqa: F811
    max_steps = 60  # 50-100 ms a step on 2 CPU cores: a few seconds of training to land the signal in
    job, run_dir = submit(
        slurm_cluster,
        tmp_path,
        tiny_data,
        [
            f"train.max_steps={max_steps}",
            f"train.decay_steps={max_steps}",
            "train.eval_interval=100000",
            "train.eval_batches=2",
            "checkpoint.interval=0",
        ],
    )
    # Signal once training is under way: what --signal=USR1@N does before a time limit, to every rank.
    deadline = time.monotonic() + 90
    while not re.search(r"\[pascal-dist\] step +[2-9] \|", output(tmp_path, job)):
        state = slurm_cluster.job(job)["JobState"]
        assert state in ("PENDING", "RUNNING") and time.monotonic() < deadline, (
            f"training never started ({state})\n{logs(tmp_path, job)}"
        )
        time.sleep(0.05)
    slurm_cluster.client("scancel", "--signal=USR1", job)

    info = slurm_cluster.wait(job, timeout=150)
    out = output(tmp_path, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), logs(tmp_path, job)
    assert f"requeued job {job} (restart 1)" in out, logs(tmp_path, job)
    assert f"job {job} (pascal-multinode) restart 1:" in out, logs(tmp_path, job)
    resumed = re.search(r"resumed from (step\d+) at step (\d+)", out)
    assert resumed, logs(tmp_path, job)
    k = int(resumed.group(2))
    assert 0 < k < max_steps and resumed.group(1) == f"step{k:08d}"
    assert latest_tag(run_dir) == f"step{max_steps:08d}"
    # The first run stopped at the checkpoint it saved; the second did exactly the remaining steps.
    steps = synced_steps(run_dir)
    first, second = steps[: len(steps) - (max_steps - k)], steps[len(steps) - (max_steps - k) :]
    assert max(first) <= k and second == list(range(k + 1, max_steps + 1)), steps


@pytest.mark.parametrize("bad", ["config", "data"])
def test_bad_request_fails_fast_on_every_rank(slurm_cluster, tiny_data, tmp_path, bad):  # noqa: F811
    # config: fails before the ranks meet; data: fails after, while the ranks are in a collective together.
    env = {"CONFIG": str(tmp_path / "missing.yaml")} if bad == "config" else {}
    extra = [f"data.dir={tmp_path}/absent"] if bad == "data" else []
    start = time.monotonic()
    job, _ = submit(slurm_cluster, tmp_path, tiny_data, ["train.max_steps=12"] + extra, **env)
    info = slurm_cluster.wait(job, timeout=90)
    elapsed = time.monotonic() - start
    err = output(tmp_path, job, "err")
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), logs(tmp_path, job)
    pattern = r"missing\.yaml' not found" if bad == "config" else r"absent.*manifest"
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and all(re.search(pattern, e) for e in errors), logs(tmp_path, job)  # one per rank
    assert "training exited with 2" in output(tmp_path, job)
    assert elapsed < 60, f"a bad request took {elapsed:.0f} s to fail"


def test_cancel_checkpoints_but_does_not_requeue(slurm_cluster, tiny_data, tmp_path):  # noqa: F811
    # scancel sends SIGTERM: the ranks still save and exit 75, but `scontrol requeue` would also requeue a
    # cancelled job, and then nobody could stop it. The script requeues only a RUNNING job.
    job, run_dir = submit(
        slurm_cluster,
        tmp_path,
        tiny_data,
        ["train.max_steps=500", "train.eval_interval=100000", "train.eval_batches=2", "checkpoint.interval=0"],
    )
    deadline = time.monotonic() + 90
    while not re.search(r"\[pascal-dist\] step +[2-9] \|", output(tmp_path, job)):
        assert slurm_cluster.job(job)["JobState"] in ("PENDING", "RUNNING") and time.monotonic() < deadline, logs(
            tmp_path, job
        )
        time.sleep(0.05)
    slurm_cluster.client("scancel", job)
    info = slurm_cluster.wait(job, timeout=60)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), logs(tmp_path, job)
    assert "so not requeueing" in output(tmp_path, job), logs(tmp_path, job)
    assert re.fullmatch(r"step\d{8}", latest_tag(run_dir)), "the ranks checkpoint on SIGTERM too"
    time.sleep(2)  # a requeue would show by now (the scheduler looks every second)
    assert slurm_cluster.job(job)["JobState"] == "CANCELLED"


def test_train_run_directly_in_a_multi_task_batch_script_stops_with_the_reason(slurm_cluster, tiny_data, tmp_path):  # noqa: F811
    """A frequent mistake: `python launcher/train.py` in an sbatch script of several tasks, without srun. The one
    process started must not wait for ranks that never come: it ends at once, exit 2, one line that says srun."""
    script = tmp_path / "no_srun.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"cd {REPO}\n"
        f"{sys.executable} launcher/train.py {' '.join(TINY)} data.dir={tiny_data} train.run_dir={tmp_path}/run\n"
    )
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-p",
            "debug",
            "--time=5",
            "--ntasks=2",
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
            f"--output={tmp_path}/job.out",
            f"--error={tmp_path}/job.err",
            str(script),
        ],
        env=slurm_cluster.env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    info = slurm_cluster.wait(proc.stdout.strip().split(";")[0], timeout=120)
    err = (tmp_path / "job.err").read_text()
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "not started by srun" in errors[0], err[-3000:]
    assert not (tmp_path / "run").exists()  # nothing was written


def test_prepare_array_parts_on_two_nodes_merge_to_the_single_process_result(slurm_cluster, tmp_path):  # noqa: F811
    """slurm/prepare_array.sh as a 2-task array, one part per node, streaming 4 plays (2 files a part); task 0's merge
    job, started once both parts succeeded, writes the data dir: byte for byte what one process writes."""
    from pascal_dist.data.prepare import embedded_files, prepare

    files = embedded_files()[:4]
    args = ["--files", *files, "--streaming", "--vocab-size", "300", "--shard-tokens", "30000"]
    out = tmp_path / "data"
    flags = ["-p", "debug", "--time=15", "--array=0-1", "--cpus-per-task=1", "--exclusive", f"--chdir={tmp_path}"]
    env = dict(PYTHON=sys.executable, OUT=str(out), HF_HOME=str(tmp_path / "hf"), HF_DATASETS_OFFLINE="1")
    job = slurm_cluster.sbatch("slurm/prepare_array.sh", flags, args, **env)

    def task_log(i, stream="out"):
        path = tmp_path / f"pascal-prepare-{job}_{i}.{stream}"
        return path.read_text(errors="replace") if path.exists() else ""

    def array_logs():
        return "\n".join(f"--- task {i} {s}\n{task_log(i, s)[-3000:]}" for i in (0, 1) for s in ("out", "err"))

    deadline = time.monotonic() + 60
    while not (merge := re.search(r"merge job (\d+) submitted", task_log(0))):
        assert time.monotonic() < deadline, f"task 0 submitted no merge job\n{array_logs()}"
        time.sleep(0.2)
    info = slurm_cluster.wait(merge.group(1), timeout=90)
    merge_log = "".join((tmp_path / f"pascal-prepare-merge-{merge.group(1)}.{s}").read_text() for s in ("out", "err"))
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{merge_log[-3000:]}\n{array_logs()}"
    assert "merged 2 parts" in merge_log

    tasks = [
        dict(re.findall(r"(\w+)=(\S*)", line))
        for line in slurm_cluster.client("scontrol", "show", "job", "-o", job).splitlines()
    ]
    assert sorted((t["ArrayTaskId"], t["JobState"], t["ExitCode"]) for t in tasks) == [
        ("0", "COMPLETED", "0:0"),
        ("1", "COMPLETED", "0:0"),
    ], array_logs()
    assert sorted(t["NodeList"] for t in tasks) == ["n1", "n2"]  # one part per node
    for i in (0, 1):
        assert re.search(rf"part {i}/2 on n[12], 1 worker\(s\)", task_log(i)), array_logs()

    reference = tmp_path / "reference"
    prepare(reference, files=files, streaming=True, vocab_size=300, shard_tokens=30000, workers=1)
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names and len(names) > 4
    assert all((out / n).read_bytes() == (reference / n).read_bytes() for n in names), names
