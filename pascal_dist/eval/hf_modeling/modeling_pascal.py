"""The Pascal-biased decoder for transformers (`PascalForCausalLM`, KV cache included), copied into every `--format hf`
export.

Standalone on purpose: it imports only torch, transformers and its configuration file next to it, so an exported
directory loads with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` where pascal-dist is not
installed. Parameter names are those of pascal-dist's PascalGPT, so the export's model.safetensors also loads back
into pascal-dist.

Attention is softmax(Q K^T / sqrt(d) + B + M) V with B[i, j] = a_(i-j) for 0 <= i - j < window, one band `a` shared
by every head and layer. For bias_kind "pascal", a_d = alpha * log(1 + C(n, d)) * s^max(d-1, 0) with
s = exp(-exp(theta)): alpha is the config's fixed `pascal_alpha` (the warm-up value at the exported step) and theta a
parameter, trainable as in pascal-dist. i and j index the sequence the cache holds, so a query decoded after cached
tokens at position i sees cached key j with a_(i-j), and left padding never changes the distance between two real
tokens.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_pascal import PascalConfig

# transformers 5.2x renamed the cache argument and output field from past_key_values to cache: accept either, and
# return the cache under the name this version's generate() reads back
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def band_distances(q_len: int, k_len: int, device: torch.device) -> Tensor:
    """(q_len, k_len) distances i - j, the queries being the last q_len of the k_len positions."""
    return torch.arange(k_len - q_len, k_len, device=device)[:, None] - torch.arange(k_len, device=device)[None, :]


def band_mask(band: Tensor, dist: Tensor) -> Tensor:
    """The additive mask for distances `dist`: band[d] where 0 <= d < len(band), 0 further below, -inf above."""
    window = band.shape[0]
    padded = torch.cat([band, band.new_zeros(1)])  # index `window` reads 0: outside the band
    bias = padded[torch.where((dist >= 0) & (dist < window), dist, window)]
    return bias.masked_fill(dist < 0, float("-inf"))


class PascalBias(nn.Module):
    """The pyramid band a_d = alpha * log(1 + C(n, d)) * exp(-exp(theta))^max(d-1, 0), d = 0 .. window-1."""

    def __init__(self, config: PascalConfig) -> None:
        super().__init__()
        self.pascal_n, self.window, self.alpha = config.pascal_n, config.pascal_window, float(config.pascal_alpha)
        self.theta = nn.Parameter(torch.full((1,), float(config.theta_init)))  # shape (1,), as pascal-dist stores it

    def forward(self) -> Tensor:
        dt = torch.promote_types(self.theta.dtype, torch.float32)  # float32 even in a half-precision model
        dev = self.theta.device
        # constants rebuilt per call (a few numbers): buffers would need re-initialising after a meta-device load
        base = torch.tensor([math.log1p(math.comb(self.pascal_n, d)) for d in range(self.window)], device=dev)
        skip_pow = torch.arange(self.window, device=dev).sub(1).clamp(min=0).float()
        penalty = torch.exp(-torch.exp(self.theta.to(dt)) * skip_pow.to(dt))  # s^max(d-1, 0)
        alpha = torch.tensor(self.alpha, dtype=torch.float32, device=dev)
        return alpha.to(dt) * base.to(dt) * penalty  # the same operations, in the same order, as pascal-dist's


class LearnedBand(nn.Module):
    """The ablation's control: `window` free band values, no pyramid and no warm-up."""

    def __init__(self, config: PascalConfig) -> None:
        super().__init__()
        self.band = nn.Parameter(torch.zeros(config.pascal_window))

    def forward(self) -> Tensor:
        return self.band.to(torch.promote_types(self.band.dtype, torch.float32))


class PascalAttention(nn.Module):
    def __init__(self, config: PascalConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.n_embd, self.layer_idx = config.n_head, config.n_embd, layer_idx
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.attn_dropout = config.attn_dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, mask: Tensor, cache: Cache | None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nh, T_cached + T, hs)
        dropout_p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class PascalMLP(nn.Module):
    def __init__(self, config: PascalConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.gelu = nn.GELU()
        self.dropout1 = nn.Dropout(config.dropout)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.dropout2 = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout2(self.c_proj(self.dropout1(self.gelu(self.c_fc(x)))))


class PascalBlock(nn.Module):
    def __init__(self, config: PascalConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = PascalAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = PascalMLP(config)

    def forward(self, x: Tensor, mask: Tensor, cache: Cache | None) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


class PascalForCausalLM(PreTrainedModel, GenerationMixin):
    """GPT-2-shaped decoder (learned absolute positions, pre-LayerNorm blocks, tied output head) with the band."""

    config_class = PascalConfig
    base_model_prefix = "transformer"  # no such submodule: the weights are flat, named as in pascal-dist
    main_input_name = "input_ids"
    _no_split_modules = ["PascalBlock"]
    _tied_weights_keys = {"lm_head.weight": "wte.weight"}

    def __init__(self, config: PascalConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(PascalBlock(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        kinds = {"pascal": PascalBias, "learned": LearnedBand}
        self.bias = kinds[config.bias_kind](config) if config.bias_kind in kinds else None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear and Embedding normal(0, initializer_range), LayerNorm 1 and 0
        if isinstance(module, (PascalAttention, PascalMLP)):  # GPT-2: residual projections scaled down with depth
            std = self.config.initializer_range / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.c_proj.weight, mean=0.0, std=std)
        elif isinstance(module, PascalBias):
            init.constant_(module.theta, float(self.config.theta_init))
        elif isinstance(module, LearnedBand):
            init.zeros_(module.band)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def band(self) -> Tensor:
        """The band vector (window,) in float32; one zero diagonal without a bias."""
        if self.bias is None:
            return torch.zeros(1, device=self.wte.weight.device)
        return self.bias()

    def attention_mask_for(self, q_len: int, k_len: int, attention_mask: Tensor | None, dtype: torch.dtype) -> Tensor:
        """The additive mask (q_len, k_len), or (B, 1, q_len, k_len) when `attention_mask` marks padded keys."""
        dist = band_distances(q_len, k_len, self.wte.weight.device)
        mask = band_mask(self.band(), dist).to(dtype)  # SDPA wants the mask in the query's dtype
        if attention_mask is None or attention_mask.dim() != 2 or bool(attention_mask.all()):
            return mask
        # a padded key is hidden from every query but itself: a padding query then still has one key to attend to,
        # so no row is all -inf and no NaN reaches the real tokens' values
        hidden = (attention_mask[:, None, None, -k_len:] == 0) & (dist != 0)  # (B, 1, q_len, k_len)
        return torch.where(hidden, float("-inf"), mask)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits (B, T, vocab) for the tokens after those in the cache; with labels, also the mean next-token loss
        (labels shifted inside, -100 ignored). Positions come from `position_ids`, else from `attention_mask`
        (left padding), else they continue the cache."""
        cache = cache if cache is not None else past_key_values
        if cache is not None:  # a cache given is a cache used: its keys are this call's context
            use_cache = True
        elif use_cache is None:
            use_cache = self.config.use_cache and not self.training
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=x.device)[None]
        if int(position_ids.max()) >= self.config.block_size:
            raise ValueError(
                f"position {int(position_ids.max())} is beyond the model's context of block_size="
                f"{self.config.block_size} tokens (learned absolute positions): keep prompt + new tokens within it"
            )
        x = self.drop(x + self.wpe(position_ids))
        mask = self.attention_mask_for(T, past + T, attention_mask, x.dtype)
        for block in self.blocks:
            x = block(x, mask, cache if use_cache else None)
        x = self.ln_f(x)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})
        return out.to_tuple() if return_dict is False else out
