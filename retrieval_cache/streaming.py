"""StreamingCache: S attention sinks plus a sliding window of the W most recent tokens (StreamingLLM).

The query at position p sees the sinks (positions 0..S-1, those <= p) and positions (p-W, p] that are >= S.
StreamingLLM rotates keys by their *slot*, not their true position: sink i sits at slot i and the window
follows contiguously, so the query sits at slot min(p, S+W-1). Stored here in an equivalent, cheaper form:
  window keys are rotated once, at their true positions (the window is contiguous, so slot distances
    equal true distances); they live in a ring of R = W + max_step slots, slot p % R, with the position each holds;
  sink keys are kept before RoPE and rotated per step at i + δ(p), δ(p) = max(0, p - (S+W-1)),
    which gives each query exactly the slot distance min(p, S+W-1) - i.
A token's output therefore does not depend on how the tokens were split into steps.
"""
import torch

from .attention import attend, rotate
from .rows import BatchRows


class StreamingCache(BatchRows):
    """Same protocol as FullCache. Tokens written past the position a row is rolled back to (rejected drafts, at
    most max_step of them: γ+1, or a prefill chunk) sit in the R - W spare ring slots, so the window survives.
    Every step has a fixed shape and no host sync (a token past the sinks writes the spare sink slot S, which no
    query reads), so `static` changes nothing here; it is kept for the protocol."""
    ROWS = {"sink_k": 1, "sink_v": 1, "ring_k": 1, "ring_v": 1, "ring_pos": 0}
    step = None  # no one-call numba step (FullCache.step): sinks are rotated per step, apart

    def __init__(self, n_layers, n_kv_heads, head_dim, sinks, window, max_step, batch=1, dtype=torch.float32, device=None):
        if sinks < 0 or window < 1 or max_step < 1:
            raise ValueError(f"StreamingCache needs sinks >= 0, window >= 1, max_step >= 1 (got {sinks}, {window}, {max_step})")
        self.S, self.W, self.max_step = sinks, window, max_step
        self.R = window + max_step
        self.static = False
        # [layers, B, Hkv, S + 1, hd], before RoPE; slot S takes the writes of tokens that are not sinks
        self.sink_k = torch.zeros(n_layers, batch, n_kv_heads, sinks + 1, head_dim, dtype=dtype, device=device)
        self.sink_v = torch.zeros_like(self.sink_k)
        self.ring_k = torch.zeros(n_layers, batch, n_kv_heads, self.R, head_dim, dtype=dtype, device=device)  # after RoPE
        self.ring_v = torch.zeros_like(self.ring_k)
        self.ring_pos = torch.full((batch, self.R), -1, dtype=torch.long, device=device)  # true position held by each slot

    def begin(self, positions: torch.Tensor, rope) -> None:
        B, T = positions.shape
        if T > self.max_step:
            raise ValueError(f"StreamingCache step of {T} tokens exceeds max_step={self.max_step}")
        S, W = self.S, self.W
        self.cos, self.sin = rope.cos_sin(positions)
        self.slots = positions % self.R  # [B, T]
        self.ring_pos.scatter_(1, self.slots, positions)
        self.b = torch.arange(B, device=positions.device)[:, None]  # [B, 1], row index for advanced indexing
        self.sink_slots = positions.clamp(max=S)  # [B, T]: a sink's own slot, S for the others
        # Sinks seen by query t, rotated at i + δ_t: [B, T*S]
        delta = (positions - (S + W - 1)).clamp(min=0)
        i = torch.arange(S, device=positions.device)
        self.cos_sink, self.sin_sink = rope.cos_sin((i[None, None, :] + delta[:, :, None]).reshape(B, T * S))
        # Visibility [B, 1, T, T*S + R]: query t sees its own copy of the sinks (i <= p_t) and its window.
        p = positions[:, :, None]
        own_copy = torch.eye(T, dtype=torch.bool, device=positions.device).repeat_interleave(S, dim=1)  # [T, T*S]
        sink_vis = own_copy[None] & (i.repeat(T)[None, None, :] <= p)
        rp = self.ring_pos[:, None, :]
        ring_vis = (rp > p - W) & (rp <= p) & (rp >= S)
        self.mask = torch.cat([sink_vis, ring_vis], dim=-1)[:, None]

    def attend(self, layer: int, q, k, v):
        B, H, T, D = k.shape
        self.sink_k[layer][self.b, :, self.sink_slots] = k.transpose(1, 2)  # [B, T, H, D]
        self.sink_v[layer][self.b, :, self.sink_slots] = v.transpose(1, 2)
        q, k = rotate(q, self.cos, self.sin), rotate(k, self.cos, self.sin)
        self.ring_k[layer][self.b, :, self.slots] = k.transpose(1, 2)  # [B, T, H, D]
        self.ring_v[layer][self.b, :, self.slots] = v.transpose(1, 2)
        S = self.S
        sk = self.sink_k[layer][:, :, None, :S].expand(B, H, T, S, D).reshape(B, H, T * S, D)
        sv = self.sink_v[layer][:, :, None, :S].expand(B, H, T, S, D).reshape(B, H, T * S, D)
        sk = rotate(sk, self.cos_sink, self.sin_sink)
        K = torch.cat([sk, self.ring_k[layer]], dim=2)
        V = torch.cat([sv, self.ring_v[layer]], dim=2)
        return attend(q, K, V, self.mask)

    @torch.no_grad()
    def fill_from(self, full, lengths: list, rope) -> None:
        """Hold the sinks and the last W of the lengths[b] tokens of each row of `full` (a FullCache of the same
        model, e.g. the target's after prefill: MagicDec's self-speculation draft cache). Sink keys are rotated
        back to before RoPE. full's k, v may live elsewhere (host memory): only these tokens are copied."""
        full.settle()
        self.ring_pos.fill_(-1)
        dev, dt = self.ring_k.device, self.ring_k.dtype
        for b, L in enumerate(lengths):
            S = min(self.S, L)
            cos, sin = rope.cos_sin(torch.arange(S, device=dev)[None])
            k, v = full.at(b, torch.arange(S))
            self.sink_k[:, b, :, :S] = rotate(k.to(dev), cos, -sin)  # R(-i) R(i) k = k
            self.sink_v[:, b, :, :S] = v.to(dev)
            w = torch.arange(max(S, L - self.W), L)  # positions of the window (a CPU index serves any device)
            slots = (w % self.R).to(dev)
            self.ring_pos[b, slots] = w.to(dev)
            k, v = full.at(b, w)
            self.ring_k[:, b, :, slots] = k.to(dev, dt)
            self.ring_v[:, b, :, slots] = v.to(dev, dt)
