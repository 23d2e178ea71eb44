"""A real two-node Slurm cluster for the tests: install if missing, start, submit, poll, always stop.

Owns the Python side of slurm/cluster/ (up.sh and down.sh start and stop the daemons; slurm.conf.in is
the cluster). The `slurm_cluster` fixture is session-scoped because start-up is the slow part (the
first scheduling pass takes a few seconds); its teardown runs down.sh whatever the tests did, which
cancels leftover jobs before stopping the daemons. Each session's cluster has its own directory and
free ports, so two test sessions on one machine do not share daemons.

Where Slurm cannot be installed or started, the tests skip with the reason, except under CI=true, where
a missing cluster is a failure: CI exists to run them.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from tests.helpers import REPO

CLUSTER = os.path.join(REPO, "slurm", "cluster")
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo", "munged", "mungekey"]
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def unavailable(reason: str):
    """Skip the Slurm tests, or fail them in CI (CI=true), where the cluster (and shellcheck) are required."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"required in CI (CI=true): {reason}", pytrace=False)
    pytest.skip(reason)


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, **kw)


def ensure_installed() -> str | None:
    """None when the Slurm and munge binaries are there (installing Debian's packages if need be), else why not."""
    if all(shutil.which(b) for b in BINARIES):
        return None
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it needs root"
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it with"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    try:
        proc = _run(install, 600, env=env)
        if proc.returncode != 0:  # most often: no package lists yet
            _run(["apt-get", "update"], 300, env=env)
            proc = _run(install, 600, env=env)
    except subprocess.TimeoutExpired as e:
        return f"'{' '.join(e.cmd)}' timed out"
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        return f"apt-get install {' '.join(PACKAGES)} did not provide {missing}: {proc.stdout[-1500:]}"
    return None


def _port_pair() -> tuple[int, int]:
    """A free port for slurmctld and a free consecutive pair for the two slurmd (n1, n2)."""

    def free(port: int = 0) -> int:
        with socket.socket() as s:
            s.bind(("0.0.0.0", port))
            return s.getsockname()[1]

    for _ in range(50):
        base = free()
        try:
            free(base + 1)
        except OSError:
            continue
        ctld = free()
        if ctld not in (base, base + 1):
            return ctld, base
    raise RuntimeError("no free consecutive port pair found")


class Cluster:
    """A started cluster: SLURM_CONF for clients, sbatch/scontrol/scancel wrappers, polling with timeouts."""

    def __init__(self, root: str):
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")

    def env(self, **extra: str) -> dict:
        # A test session that itself runs inside a Slurm job must not pass that job's SLURM_*/SBATCH_*
        # variables on to the jobs it submits.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env.update(SLURM_CONF=self.conf, **extra)
        return env

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster, from the checkout; output and errors in .stdout."""
        return _run(list(args), timeout, env=self.env(), cwd=REPO)

    def client(self, *args: str, timeout: float = 30) -> str:
        proc = self.run(*args, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stdout}")
        return proc.stdout

    def sbatch(self, script: str, flags: list[str], args: list[str] = (), **env: str) -> str:
        """Submit the repository's `script` (from the checkout, as users do) with sbatch `flags`; the job id."""
        proc = _run(
            ["sbatch", "--parsable", *flags, os.path.join(REPO, script), *args], 30, cwd=REPO, env=self.env(**env)
        )
        assert proc.returncode == 0, f"sbatch refused the job: {proc.stdout}"
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        return dict(re.findall(r"(\w+)=(\S*)", self.client("scontrol", "show", "job", "-o", job_id)))

    def wait(self, job_id: str, timeout: float, until=None) -> dict:
        """Poll until the job reaches a final state (or `until(info)` holds); on timeout cancel it and fail."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if until(info) if until else info.get("JobState") in FINAL_STATES:
                return info
            if time.monotonic() > deadline:
                self.client("scancel", job_id)
                pytest.fail(f"job {job_id} not done after {timeout:.0f} s: {info}\n{self.log_tail()}", pytrace=False)
            time.sleep(0.2)

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd-n1.log", "slurmd-n2.log"):
            path = os.path.join(self.root, "log", name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f"--- {name}\n" + "".join(f.readlines()[-lines:]))
        return "\n".join(out)


_start_failure: list[str] = []  # a failed start is not retried for every test of the session


@pytest.fixture(scope="session")
def slurm_cluster():
    """munged + slurmctld + slurmd n1, n2 for the session; stopped at the end whatever happened."""
    if _start_failure:
        unavailable(_start_failure[0])
    reason = ensure_installed()
    if reason:
        reason = f"no Slurm cluster: {reason}"
        _start_failure.append(reason)
        unavailable(reason)
    # Not under pytest's tmp_path: munged refuses a socket whose directories are not world-searchable
    # (pytest's are 0700), and unix socket paths must stay under 108 bytes.
    root = tempfile.mkdtemp(prefix="pascal-slurm-", dir="/tmp")
    os.chmod(root, 0o755)
    ctld_port, node_port = _port_pair()
    try:
        try:
            up = _run([os.path.join(CLUSTER, "up.sh"), root, str(ctld_port), str(node_port)], 60)
            reason = None if up.returncode == 0 else f"no Slurm cluster: up.sh failed: {up.stdout[-3000:]}"
        except subprocess.TimeoutExpired:
            reason = "no Slurm cluster: slurm/cluster/up.sh did not finish in 60 s"
        if reason:
            _start_failure.append(reason)
            unavailable(reason)
        yield Cluster(root)
    finally:
        _run([os.path.join(CLUSTER, "down.sh"), root], 60)
        shutil.rmtree(root, ignore_errors=True)
