"""ReDrafter's recurrent draft head: it drafts from the hidden state of the model it drafts for.

Inputs: h [B, D], the final-norm hidden state (Transformer.hidden) whose distribution chose the pending token x_1,
and the embeddings of x_1 and of each token it drafts (the target's own table, frozen, not stored here).
  s_0 = 0,  s_j = SiLU(W e(x_j) + U s_{j-1} + b)                      recurrence over its own drafts  [B, D]
  z_j = h + F([s_j ; h]),  F = Linear(2D, F) -> SiLU -> Linear(F, D)   features, a residual on h
  logits_j = out(norm(z_j))  [B, R]                                    draft j+1's logits over R kept tokens
so step j scores the token after x_j. A reduced vocabulary (vocab_ids, the kept R token ids) keeps the output
projection small (49K rows would cost more than the rest); q is 0 outside it, which verification handles exactly.
`out` starts as the target's own head rows of the kept tokens and F as zero, so an untrained head predicts x_1 again.
Saved as a folder: config.json (kind "recurrent-head") and head.safetensors (safetensors only).
"""
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from cpu_kernels import Blocks

from ..errors import UserError, first_line
from .kernels import linears_on_numba

KIND = "recurrent-head"


class RecurrentHead(nn.Module):
    def __init__(self, hidden: int, vocab_size: int, draft_vocab: int, eps: float = 1e-5, ffn: int | None = None):
        super().__init__()
        D, width = hidden, ffn or hidden  # width: the feature MLP's
        self.vocab_size, self.eps = vocab_size, eps
        self.W = nn.Linear(D, D)  # token embedding -> state (its bias is b)
        self.U = nn.Linear(D, D, bias=False)  # previous state -> state
        self.fc1 = nn.Linear(2 * D, width)
        self.fc2 = nn.Linear(width, D)
        self.norm = nn.Parameter(torch.ones(D))
        self.out = nn.Linear(D, draft_vocab, bias=False)
        self.register_buffer("vocab_ids", torch.zeros(draft_vocab, dtype=torch.long))  # [R] kept token ids

    @property
    def hidden(self) -> int:
        return self.norm.numel()

    def on_kernels_of(self, target) -> "RecurrentHead":
        """On its target's matrix kernels: for a numba target, its five maps become cpu_kernels.Linear over Q8_0 blocks
        of their weights (linears_on_numba: maps whose input width is not whole blocks of 32 stay on torch). A
        drafter's numbers never change the output; Q8_0 kept the shipped head's median α within 0.01 (drafters README) at a quarter of the
        fp32 bytes, which a step re-reads after every target step has evicted them from the caches
        (benchmarks/results/drafters-cpu-head.md: one step, torch against numba). Inference only: training keeps
        nn.Linear."""
        if target.runtime.kernels == "numba":
            linears_on_numba(self, lambda w: Blocks.quantize(w, "Q8_0"))
        return self

    def step(self, e: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        """e [..., D] the embedding of the latest token, s [..., D] the state before it (None: s_0 = 0) -> s'."""
        x = self.W(e)
        return F.silu(x if s is None else x + self.U(s))

    def reduced_logits(self, s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """s, h [..., D] -> fp32 logits over the kept tokens [..., R]."""
        z = h + self.fc2(F.silu(self.fc1(torch.cat([s, h], dim=-1))))
        z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm
        return self.out(z).float()

    def logits(self, s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """[..., V] over the target's whole vocabulary, -inf outside the kept tokens."""
        r = self.reduced_logits(s, h)
        full = r.new_full(r.shape[:-1] + (self.vocab_size,), float("-inf"))
        return full.index_copy_(-1, self.vocab_ids, r)

    def initialize(self, target_head, vocab_ids: torch.Tensor) -> "RecurrentHead":
        """Start from the target's head rows of the kept tokens (target_head: [V, D], or cpu_kernels.Blocks), F = 0."""
        self.vocab_ids.copy_(vocab_ids)
        with torch.no_grad():
            rows = target_head.dequantize(vocab_ids) if isinstance(target_head, Blocks) else target_head[vocab_ids]
            self.out.weight.copy_(rows.float())
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)
        return self

    def save(self, folder: str, meta: dict) -> None:
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        config = dict(kind=KIND, hidden_size=self.hidden, ffn_size=self.fc1.out_features, vocab_size=self.vocab_size,
                      draft_vocab=len(self.vocab_ids), rms_norm_eps=self.eps, **meta)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous().cpu()
              for k, v in self.state_dict().items()}
        save_file(sd, os.path.join(folder, "head.safetensors"))


def is_head(folder: str) -> bool:
    """Whether folder holds a recurrent head (and not a model)."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f).get("kind") == KIND
    except (OSError, ValueError):
        return False


def load_head(folder: str, target, device=None) -> RecurrentHead:
    """The head saved in folder, in fp32 on device, checked against the target it drafts for, on the target's matrix
    kernels (on_kernels_of)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not is_head(folder):
        raise UserError(f"{folder}: not a recurrent draft head (make one with `triforce distill --kind head`)")
    with open(os.path.join(folder, "config.json")) as f:
        c = json.load(f)
    tc = target.config
    try:
        if (c["hidden_size"], c["vocab_size"]) != (tc.hidden_size, tc.vocab_size):
            raise UserError(f"{folder}: the head was made for a model of width {c['hidden_size']} and vocabulary "
                            f"{c['vocab_size']}; this one has {tc.hidden_size} and {tc.vocab_size}")
        head = RecurrentHead(c["hidden_size"], c["vocab_size"], c["draft_vocab"], c["rms_norm_eps"], c.get("ffn_size"))
        sd = load_file(os.path.join(folder, "head.safetensors"))
        head.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    except (KeyError, TypeError, OSError, RuntimeError, SafetensorError) as e:  # not a whole head's files
        raise UserError(f"{folder}: not a readable recurrent draft head ({first_line(e)})") from None
    return head.to(device or target.device).eval().on_kernels_of(target)
