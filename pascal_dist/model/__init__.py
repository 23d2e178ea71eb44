"""The model: the Pascal-biased decoder, its bias, chunked loss and sampling. Knows nothing of DeepSpeed or files."""

from pascal_dist.model.bias import PascalBias, alpha, band_base, pyramid_layer
from pascal_dist.model.decoder import KVCache, PascalGPT

__all__ = ["KVCache", "PascalBias", "PascalGPT", "alpha", "band_base", "pyramid_layer"]
