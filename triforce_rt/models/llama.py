"""A lean Llama-family forward (Llama 2/3, Mistral, Qwen2, SmolLM2): RMSNorm, GQA attention, SwiGLU.

Parameter names follow transformers' LlamaForCausalLM without the "model." prefix, so its state dict loads as is.
The cache passed to forward decides which keys and values attention sees (retrieval_cache protocol).
"""
import torch
import torch.nn.functional as F
from torch import nn

from cpu_kernels import linear

from ..errors import UserError
from ..runtime import Runtime
from .config import ModelConfig
from .rope import Rope


def kept_rows(vocab_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[V]: the row of each token id among a reduced vocabulary's R kept ids (vocab_ids), R for every other token."""
    R = len(vocab_ids)
    index = torch.full((vocab_size,), R, dtype=torch.long, device=vocab_ids.device)
    index[vocab_ids] = torch.arange(R, device=index.device)
    return index


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # x / rms(x) in fp32, then scaled; as transformers does (torch's fused x / rms(x))
        h = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D = cfg.hidden_size
        self.q_proj = nn.Linear(D, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, D, bias=cfg.o_bias)
        self.reduce = None  # tensor parallel: sums the ranks' partial outputs in place (parallel.py)

    def forward(self, x, layer: int, cache):  # x [B, T, D]
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, Hq, T, hd]
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        out = cache.attend(layer, q, k, v)  # RoPE, cache write and attention: [B, Hq, T, hd]
        out = self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        if self.reduce:
            self.reduce(out)
        return out


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.reduce = None  # tensor parallel: as Attention.reduce

    def forward(self, x):  # down(silu(gate x) * up x)
        out = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        if self.reduce:
            self.reduce(out)
        return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.fused = None  # the same forward on the numba kernels, for the steps it takes (models/kernels.py)

    def forward(self, x, layer: int, cache):
        if self.fused is not None and self.fused.takes(x):
            return self.fused(x, layer, cache)
        x = x + self.self_attn(self.input_layernorm(x), layer, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        R = cfg.draft_vocab
        # A reduced vocabulary keeps R tokens (vocab_ids) plus one input row for every other token; the head scores
        # only the R kept tokens, so the drafter's q is 0 outside them (verification handles that, verify.py).
        self.embed_tokens = nn.Embedding(R + 1 if R else cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        out = R or cfg.vocab_size
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, out, bias=False)
        self.register_buffer("vocab_ids", torch.zeros(R, dtype=torch.long) if R else None)  # [R] kept token ids
        self._vocab_index = None  # [V] row of each token id in embed_tokens (R for the others)
        self.rope = None  # built by setup_rope once the model sits on its device
        self.runtime = Runtime()  # tokenizer, source, graphs and offload policy (runtime.py)

    @property
    def tokenizer(self):
        return self.runtime.tokenizer

    @property
    def source(self) -> str | None:
        return self.runtime.source

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def setup_rope(self, max_len: int | None = None):
        self.rope = Rope(self.config, self.device, max_len)
        return self

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache, last_only: bool = False):
        """input_ids, positions [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only) in fp32.
        In eval mode this runs under inference_mode; in train mode (distillation) it keeps the graph."""
        with torch.inference_mode(not self.training):
            return self.score(self.hidden(input_ids, positions, cache, last_only))

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [..., D] -> fp32 logits [..., V]."""
        head = self.runtime.head  # the numba kernel's packed head, or None (torch)
        return self.full_vocab(linear(x, self.head, head) if head else F.linear(x, self.head).float())

    def hidden(self, input_ids, positions, cache, last_only: bool = False, tree=None) -> torch.Tensor:
        """The final-norm hidden states [B, T, D] that the head scores. tree: a tree-shaped step's ancestor mask
        [B, T, T] (FullCache.begin_tree)."""
        if self.rope is None:
            self.setup_rope()
        if tree is None:
            cache.begin(positions, self.rope)
        else:
            cache.begin_tree(positions, self.rope, tree)
        if self.vocab_ids is not None:
            input_ids = self.vocab_index[input_ids]
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, i, cache)
        if last_only:
            x = x[:, -1:]
        return self.norm(x)

    @property
    def head(self):
        """[R or V, D]: the rows scored by the head (tied: the embedding without its 'other' row); cpu_kernels.Blocks
        for a head read from GGUF blocks."""
        m = self.lm_head if self.lm_head is not None else self.embed_tokens
        if getattr(m, "blocks", None) is not None:
            return m.blocks
        return m.weight if self.lm_head is not None else m.weight[: self.config.draft_vocab or None]

    @property
    def vocab_index(self) -> torch.Tensor:
        if self._vocab_index is None or self._vocab_index.device != self.vocab_ids.device:
            self._vocab_index = kept_rows(self.vocab_ids, self.config.vocab_size)
        return self._vocab_index

    def full_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., R] reduced-vocabulary logits -> [..., V], -inf outside the kept tokens (identity otherwise)."""
        if self.vocab_ids is None:
            return logits
        full = logits.new_full(logits.shape[:-1] + (self.config.vocab_size,), float("-inf"))
        return full.index_copy_(-1, self.vocab_ids, logits)

    def with_dtype(self, dtype: torch.dtype | None) -> "Transformer":
        """This model in another dtype: a copy made once and kept (e.g. bf16 drafting tiers for an fp32 target)."""
        if dtype is None or dtype == self.norm.weight.dtype:
            return self
        rt = self.runtime
        if rt.weight_stream is not None:
            raise ValueError("a model whose weights stream from host memory has no copy in another dtype")
        if self.weight_blocks:
            raise UserError("a model read from GGUF blocks (--kernels numba) has no copy in another dtype; drop "
                            "--draft-dtype or use --kernels torch")
        if dtype not in rt.casts:
            with torch.device("meta"):
                m = Transformer(self.config)
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.state_dict().items()}
            m.load_state_dict(sd, assign=True)
            m.eval().setup_rope(self.rope.max_len if self.rope else None)
            m.runtime = Runtime(rt.tokenizer, rt.source, rt.cuda_graphs, tensor_parallel=rt.tensor_parallel)
            rt.casts[dtype] = m
        return rt.casts[dtype]

    @property
    def weight_blocks(self) -> list:
        """The cpu_kernels.Blocks of the modules read from a GGUF's blocks (models/kernels.py); empty otherwise."""
        return [m.blocks for m in self.modules() if getattr(m, "blocks", None) is not None]

    def weight_bytes(self) -> int:
        """Bytes of the weights a forward reads: the parameters, and the blocks of block-quantized modules."""
        return sum(b.nbytes for b in self.weight_blocks) + sum(p.numel() * p.element_size() for p in self.parameters())

    def new_cache(self, cache_cls, *args, **kwargs):
        """Allocate a cache shaped for this model: cache_cls(n_layers, n_kv_heads, head_dim, *args, dtype, device)."""
        c, w = self.config, self.norm.weight
        kwargs.setdefault("dtype", w.dtype)
        kwargs.setdefault("device", w.device)
        return cache_cls(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, *args, **kwargs)
