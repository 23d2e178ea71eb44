"""Typed configuration schema: every knob of a run, its default (the reference recipe) and what it means.

Plain dataclasses with no I/O, so the model can take its own section without knowing about YAML.
Loading, overrides and validation live in `pascal_dist.config.load`; docs/configuration.md is generated from
this file (field docstrings included) by `python -m pascal_dist.config.reference`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

BIAS_KINDS = ("pascal", "learned")  # model.bias.kind


@dataclass
class BiasConfig:
    kind: str = "pascal"
    """pascal: the pyramid band, ramped in by the warm-up, with the learnable skip penalty | learned: the control, the
    same `window` diagonals as free parameters (one per diagonal, shared by every head and layer), initialised at 0,
    no pyramid and no warm-up; pascal_n, theta_init and warmup_steps do not apply to it."""
    pascal_n: int = 3
    """Layer of Pascal's pyramid the band coefficients come from (3 in the reference model)."""
    window: int = 3
    """Number of biased diagonals: distance 0 .. window-1 (3 in the reference model: self, neighbour, skip pair)."""
    theta_init: float = -1.5
    """Initial value of the learnable skip parameter; skip factor = exp(-exp(theta))."""
    warmup_steps: int = 4000
    """T in alpha(t) = 0.01 + 0.99 min(t/T, 1), t = optimizer steps applied."""


@dataclass
class AttentionConfig:
    backend: str = "sdpa"
    """reference (dense math, the test oracle) | sdpa (SDPA, bias as a float mask) | none (no bias) | banded
    (causal flash + the exact band correction, O(T) extra memory; with attention dropout it runs the sdpa path)
    | fused (one Triton flash kernel with the band and the dropout inside; needs a GPU and Triton)."""
    kernels: str = "auto"
    """Which implementation a backend runs where it has more than one: auto | triton | torch. Only `banded` has
    two (its band correction): auto = Triton kernels on CUDA, PyTorch ops elsewhere; triton on a CPU needs
    TRITON_INTERPRET=1 (Triton's interpreter, for tests). `fused` is Triton only; the others are PyTorch only."""


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    """Must equal the tokenizer's vocabulary (checked against the data manifest)."""
    block_size: int = 256
    """Context length in tokens (learned position table of this size)."""
    n_layer: int = 12
    """Transformer blocks."""
    n_head: int = 12
    """Attention heads; n_embd must be divisible by it."""
    n_embd: int = 768
    """Residual stream width (MLP hidden is 4x)."""
    dropout: float = 0.1
    """Dropout on embeddings, residual branches and MLP."""
    attn_dropout: float = 0.1
    """Dropout on the attention weights."""
    activation_checkpointing: bool = False
    """Recompute each block in backward: trades ~30% more compute for much less activation memory."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    bias: BiasConfig = field(default_factory=BiasConfig)


@dataclass
class DataConfig:
    dir: str = "data/embedded"
    """Directory written by launcher/prepare_data.py (shards + manifest.json + tokenizer.json)."""
    train_split: str = "train"
    """Manifest split to train on."""
    val_split: str = "val"
    """Manifest split to evaluate on (e.g. source_validation for a source's own split)."""
    verify: bool = False
    """Before the first step, rank 0 checks every shard's sha256 and token ids against the manifest, as
    `pascal-dist prepare --verify DIR` does: one read of the whole data dir (docs/data.md gives its cost per GB).
    Off, the loader still refuses any id >= vocab_size in each batch it gathers."""


@dataclass
class TrainConfig:
    seed: int = 1337
    """Seeds weights, data order and dropout: a run is a function of (config, seed, data)."""
    micro_batch_size: int = 64
    """Sequences per rank per forward/backward."""
    grad_accum: int = 2
    """Micro-batches per optimizer step. Global batch = micro_batch_size x grad_accum x world size."""
    max_steps: int = 20000
    """Optimizer steps."""
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """LR floor as a fraction of lr, reached at decay_steps and kept after."""
    warmup_steps: int = 2000
    """Linear LR warm-up, in optimizer steps."""
    decay_steps: int = 8000
    """Step at which the cosine decay reaches the floor."""
    weight_decay: float = 0.1
    """Applied to matrices and embeddings only; LayerNorm parameters and theta are not decayed."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping (written into the ds_config)."""
    eval_interval: int = 250
    """Evaluate every N optimizer steps (and at the end)."""
    eval_batches: int = 100
    """Validation micro-batches per rank per evaluation."""
    compile: Optional[bool] = None
    """torch.compile the model; None = on when a GPU is present."""
    compile_scope: str = "blocks"
    """With compile: 'blocks' compiles each transformer block and the loss head apart (regional compilation, as
    torchtitan does): the blocks share one compiled graph, so compiling takes about a fifth of the time; only the
    embeddings, the band and the final LayerNorm run uncompiled. 'model' compiles the whole model as one graph
    (DeepSpeed's engine.compile()), which can also fuse across block boundaries."""
    activation_memory_budget: float = 1.0
    """With compile: the share of activations torch.compile may keep for backward, in (0, 1]. Below 1 its
    partitioner recomputes the cheapest ops in backward instead (pointwise first: GELU, residual adds); 0.9 keeps
    about 1.7 GiB less at the reference batch (bench/bench_memory.py). 1 = torch's default."""
    run_dir: str = "runs/default"
    """Where TensorBoard events, checkpoints and the resolved config go."""
    time_limit_s: float = 0.0
    """Stop (checkpoint, exit 75) before this many seconds of wall time have passed; 0 = no limit."""
    max_bad_steps: int = 5
    """Consecutive steps with a non-finite loss or gradient norm (skipped on all ranks) before the run stops."""


@dataclass
class LoggingConfig:
    log_interval: int = 10
    """Write train scalars every N optimizer steps."""
    tensorboard: bool = True
    """Write TensorBoard events under <run_dir>/tensorboard (rank 0)."""
    sample_prompts: List[str] = field(default_factory=lambda: ["I think ", "The king said"])
    """Prompts continued at every evaluation and logged as TensorBoard text (fixed seed); [] = none."""
    sample_tokens: int = 40
    """New tokens per sample."""


@dataclass
class CheckpointConfig:
    interval: int = 1000
    """Save every N optimizer steps (and at the end); 0 = only at the end."""
    keep_last: int = 3
    """Newest checkpoints kept on disk, plus the best by validation loss; older ones go after a successful save."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
