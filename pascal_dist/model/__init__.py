"""The model: the Pascal-biased decoder, its bias, chunked loss and sampling. Knows nothing of DeepSpeed or files."""

from pascal_dist.model.bias import LearnedBand, PascalBias, alpha, band_base, make_bias, pyramid_layer
from pascal_dist.model.decoder import KVCache, PascalGPT

__all__ = ["KVCache", "LearnedBand", "PascalBias", "make_bias", "PascalGPT", "alpha", "band_base", "pyramid_layer"]
