"""ModelConfig: the flat set of numbers our forward needs, read from a transformers config."""
from dataclasses import dataclass, field

SUPPORTED = ("llama", "mistral", "qwen2")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # HF rope parameters: rope_type, factor, ... ({} = default)
    eos_token_ids: tuple = ()
    model_type: str = "llama"
    sliding_window: int | None = None  # Mistral v0.1 / Qwen2 option; our forward attends fully, so it caps the context
    draft_vocab: int = 0  # a distilled drafter's reduced vocabulary (tokens kept; 0 = the whole vocabulary)

    @property
    def context_limit(self) -> int:
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)

    @classmethod
    def from_hf(cls, hf) -> "ModelConfig":
        if hf.model_type not in SUPPORTED:
            raise ValueError(f"unsupported model type '{hf.model_type}' (supported: {', '.join(SUPPORTED)})")
        # transformers >= 5 keeps theta and scaling together in rope_parameters; 4.x has rope_theta + rope_scaling.
        rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
        theta = rope.pop("rope_theta", None) or getattr(hf, "rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope = {} if rope_type == "default" else {**rope, "rope_type": rope_type}
        eos = hf.eos_token_id
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        attention_bias = getattr(hf, "attention_bias", False)
        window = getattr(hf, "sliding_window", None)
        if hf.model_type == "qwen2" and not getattr(hf, "use_sliding_window", False):
            window = None
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_hidden_layers=hf.num_hidden_layers,
            num_attention_heads=hf.num_attention_heads,
            num_key_value_heads=hf.num_key_value_heads or hf.num_attention_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            max_position_embeddings=hf.max_position_embeddings,
            rms_norm_eps=hf.rms_norm_eps,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=hf.model_type == "qwen2" or attention_bias,
            o_bias=attention_bias,
            rope_theta=float(theta),
            rope_scaling=rope,
            eos_token_ids=eos,
            model_type=hf.model_type,
            sliding_window=window,
            draft_vocab=int(getattr(hf, "draft_vocab", 0) or 0),
        )
