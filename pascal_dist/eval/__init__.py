"""After training: evaluation (perplexity, LAMBADA), export to safetensors, and the ablation driver."""
