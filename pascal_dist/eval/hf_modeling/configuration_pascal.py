"""The transformers configuration of the Pascal-biased decoder (`PascalConfig`), copied into every `--format hf` export.

Standalone on purpose: it imports only transformers, so an exported directory loads with
`AutoConfig.from_pretrained(dir, trust_remote_code=True)` where pascal-dist is not installed.
"""

from transformers import PretrainedConfig


class PascalConfig(PretrainedConfig):
    """Shape of the decoder and its attention bias.

    bias_kind: "pascal" (the pyramid band, strength `pascal_alpha`, skip parameter theta in the weights), "learned"
    (`pascal_window` free band values in the weights) or "none" (causal attention without a bias).
    pascal_alpha: the warm-up strength alpha(t) at the step the model was exported; fixed here, since the warm-up
    schedule belongs to training, not to the model.
    """

    model_type = "pascal_gpt"
    # the names transformers' generic code (generation, lm-eval, pipelines) reads
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "block_size",
    }

    def __init__(
        self,
        vocab_size: int = 8192,
        block_size: int = 256,
        n_layer: int = 12,
        n_head: int = 12,
        n_embd: int = 768,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        layer_norm_epsilon: float = 1e-5,
        initializer_range: float = 0.02,
        bias_kind: str = "pascal",
        pascal_n: int = 3,
        pascal_window: int = 3,
        pascal_alpha: float = 1.0,
        theta_init: float = -1.5,
        use_cache: bool = True,
        **kwargs,
    ) -> None:
        if bias_kind not in ("pascal", "learned", "none"):
            raise ValueError(f"bias_kind must be 'pascal', 'learned' or 'none', got {bias_kind!r}")
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_embd = n_embd
        self.dropout = dropout
        self.attn_dropout = attn_dropout
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.bias_kind = bias_kind
        self.pascal_n = pascal_n
        self.pascal_window = pascal_window
        self.pascal_alpha = pascal_alpha
        self.theta_init = theta_init
        self.use_cache = use_cache
        kwargs.setdefault("tie_word_embeddings", True)  # the output head is the token embedding
        super().__init__(**kwargs)
