"""Fixtures shared across the suite: a small real-text dataset prepared once per session."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's CPU interpreter. It must be chosen before anything imports triton
    # (torch._dynamo does, during collection), or triton's own helpers stay compiled-only.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests (and parametrized cases) need CUDA: skipped without it, so no such test can silently run
    somewhere it checks nothing, and `pytest -m gpu` on a GPU machine runs every one of them."""
    if torch.cuda.is_available():
        return
    needs_cuda = pytest.mark.skip(reason="needs CUDA (a `gpu` test)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(needs_cuda)


@pytest.fixture
def kernels_take_cpu_tensors(request):
    """For Triton kernel tests that hand CPU tensors to the kernels: only Triton's interpreter takes those. On a
    GPU machine the `gpu`-marked tests check the compiled kernels instead."""
    if torch.cuda.is_available() and request.node.get_closest_marker("gpu") is None:
        pytest.skip("runs the kernels in Triton's CPU interpreter; on a GPU the `gpu` tests cover them")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Three of the embedded corpus's plays, BPE vocab 512: real text, prepared in a couple of seconds."""
    from pascal_dist.data.prepare import embedded_files, prepare
    from pascal_dist.data.shards import read_manifest

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare(out, files=embedded_files()[:3], vocab_size=512)
    assert read_manifest(out)["tokenizer"]["vocab_size"] == 512
    return str(out)


@pytest.fixture(scope="session")
def stage_runs(tiny_data, tmp_path_factory):
    """One finished 12-step 2-rank run per ZeRO stage: {stage: run_dir} (launches are the expensive part)."""
    from tests.helpers import TINY, run_train

    out = {}
    for stage in (1, 2, 3):
        run_dir = str(tmp_path_factory.mktemp(f"zero{stage}"))
        proc = run_train(f"configs/zero{stage}.json", TINY + [f"data.dir={tiny_data}", f"train.run_dir={run_dir}"])
        assert proc.returncode == 0, proc.stdout[-3000:]
        out[stage] = run_dir
    return out
