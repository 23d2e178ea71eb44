"""Consolidated models: DeepSpeed checkpoint (any ZeRO stage) -> safetensors + config + tokenizer, and loading it back.

An exported directory holds `model.safetensors` (fp32 weights, from the optimizer's master copy),
`config.yaml` (the run's resolved config) and `tokenizer.json`, and is all that evaluation and generation
need: loading it imports neither DeepSpeed nor the data pipeline.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from pascal_dist.attention import runnable_backend
from pascal_dist.config import RunConfig, load_config
from pascal_dist.errors import UserError
from pascal_dist.model import PascalGPT

WEIGHTS, CONFIG, TOKENIZER, META = "model.safetensors", "config.yaml", "tokenizer.json", "export.json"


class ExportError(UserError, ValueError):
    """A checkpoint or export directory that cannot be read; the message names the path."""


def resolve_checkpoint(ckpt: str) -> tuple[str, str]:
    """(checkpoints dir, tag) from a run dir, a checkpoints dir, or one tag's dir."""
    for candidate in (os.path.join(ckpt, "checkpoints"), ckpt):
        latest = os.path.join(candidate, "latest")
        if os.path.isfile(latest):
            with open(latest) as f:
                return candidate, f.read().strip()
    if _model_states_file(ckpt):
        return os.path.dirname(os.path.abspath(ckpt)), os.path.basename(os.path.abspath(ckpt))
    raise ExportError(f"'{ckpt}' is not a pascal-dist checkpoint (no 'latest' pointer, no *model_states.pt)")


def _model_states_file(tag_dir: str) -> str | None:
    """DeepSpeed's file holding the client state: mp_rank_00_... (ZeRO 1/2), zero_pp_rank_0_mp_rank_00_... (ZeRO-3)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if os.path.isfile(os.path.join(tag_dir, name)):
            return os.path.join(tag_dir, name)
    return None


def export_checkpoint(ckpt: str, out_dir: str) -> str:
    """Write an exported model for the checkpoint at `ckpt`; refuses to overwrite a non-empty `out_dir`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_model

    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ExportError(f"output directory '{out_dir}' is not empty; choose a new one")
    ckpt_dir, tag = resolve_checkpoint(ckpt)
    states_file = _model_states_file(os.path.join(ckpt_dir, tag))
    if states_file is None:
        raise ExportError(f"'{os.path.join(ckpt_dir, tag)}': no DeepSpeed model states file (incomplete checkpoint?)")
    client = torch.load(states_file, map_location="cpu", weights_only=False).get("pascal_dist")
    if not client:
        raise ExportError(f"'{states_file}': no pascal_dist client state (not written by pascal-dist?)")
    cfg_yaml = client["config"]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(cfg_yaml)
    try:
        cfg = load_config(f.name)
    finally:
        os.remove(f.name)
    tokenizer = os.path.join(cfg.data.dir, "tokenizer.json")
    if not os.path.isfile(tokenizer):
        raise ExportError(f"tokenizer '{tokenizer}' of the run's data.dir is missing; it is needed to export")

    state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    cfg.model.attention.backend = runnable_backend(cfg.model.attention.backend)  # the saved config keeps its own
    model = PascalGPT(cfg.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to wte.weight
    if missing or unexpected:
        raise ExportError(
            f"'{os.path.join(ckpt_dir, tag)}': weights do not match the config's model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    tmp = out_dir.rstrip("/") + f".tmp-{os.getpid()}"
    os.makedirs(tmp)
    save_model(model, os.path.join(tmp, WEIGHTS))  # handles the tied embedding / LM head
    with open(os.path.join(tmp, CONFIG), "w") as f:
        f.write(cfg_yaml)
    shutil.copyfile(tokenizer, os.path.join(tmp, TOKENIZER))
    with open(os.path.join(tmp, META), "w") as f:
        json.dump(
            {
                "checkpoint": os.path.abspath(os.path.join(ckpt_dir, tag)),
                "step": client["bias_step"],
                "n_params": model.num_params(),
            },
            f,
            indent=2,
        )
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def load_exported(path: str, device: str | torch.device = "cpu") -> tuple[PascalGPT, RunConfig, object]:
    """(model in eval mode, run config, tokenizers.Tokenizer) from an exported directory."""
    from safetensors.torch import load_model
    from tokenizers import Tokenizer

    for name in (WEIGHTS, CONFIG, TOKENIZER):
        if not os.path.isfile(os.path.join(path, name)):
            raise ExportError(f"'{path}' is not an exported model: missing {name} (make one with launcher/export.py)")
    cfg = load_config(os.path.join(path, CONFIG))
    cfg.model.attention.backend = runnable_backend(cfg.model.attention.backend)
    model = PascalGPT(cfg.model)
    load_model(model, os.path.join(path, WEIGHTS), device=str(device))
    model.to(device).eval()
    meta_file = os.path.join(path, META)
    if os.path.isfile(meta_file):
        with open(meta_file) as f:
            model.set_bias_step(json.load(f)["step"])  # alpha as it was when the checkpoint was taken
    return model, cfg, Tokenizer.from_file(os.path.join(path, TOKENIZER))
