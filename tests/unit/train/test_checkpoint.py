"""The checkpoint commit protocol in one process: the `latest` pointer moves only once meta.json is complete."""

import os

import pytest


class FilesOnlyEngine:
    """Stands in for DeepSpeed's engine in a save: writes one file per rank into the tag, as save_checkpoint does."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        import torch

        assert save_latest is False  # our pointer, not DeepSpeed's, says which checkpoint is complete
        torch.save(client_state, os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_latest_moves_only_once_meta_json_is_complete(one_rank_group, tmp_path, monkeypatch):
    """Each time the `latest` pointer is replaced (by any code path), the tag it names must already be complete and
    loadable: a kill between the two writes must never leave a pointer to a checkpoint without meta.json."""
    from pascal_dist.train.checkpoint import POINTER, Checkpointer, Identity, latest_tag

    ckpt_dir = str(tmp_path / "checkpoints")
    ckpt = Checkpointer(
        ckpt_dir, rank=0, world_size=1, keep_last=2, identity=Identity({"n_layer": 1}, "abc"), log=lambda msg: None
    )
    pointed, replace = [], os.replace

    def watching_replace(src, dst, *args, **kwargs):
        if os.path.basename(dst) == POINTER:
            with open(src) as f:
                tag = f.read().strip()
            pointed.append((tag, ckpt.problem(tag)))
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", watching_replace)
    for step in (2, 4):
        ckpt.save(FilesOnlyEngine(), step, {"bias_step": step})
    assert pointed == [("step00000002", None), ("step00000004", None)]
    assert latest_tag(ckpt_dir) == "step00000004"
