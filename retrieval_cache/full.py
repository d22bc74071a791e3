"""FullCache: every token, preallocated. The target's cache."""
import torch

from .attention import attend, causal_mask, rotate


class FullCache:
    """k, v [layers, B, Hkv, max_len, D], keys stored after RoPE at their true positions.

    Protocol shared by all caches:
      begin(positions [B, T], rope)  once per forward: computes RoPE for the step, reserves T slots;
      attend(layer, q, k, v)         per layer, q/k/v before RoPE: writes k, v and returns attention;
      rollback(n)                    forgets the last n tokens by moving `length` (no data moves).
    `rope` is any object with cos_sin(positions) -> (cos, sin) [B, T, D].
    """

    def __init__(self, n_layers, n_kv_heads, head_dim, max_len, batch=1, dtype=torch.float32, device=None):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0
        # Post-RoPE query of the last token of the latest step, per layer: [layers, B, Hq, D].
        # RetrievalCache.select scores chunks with it.
        self.last_q = None

    def begin(self, positions: torch.Tensor, rope) -> None:
        T = positions.shape[1]
        if self.length + T > self.max_len:
            raise ValueError(f"FullCache overflow: {self.length} + {T} tokens > capacity {self.max_len}")
        self.cos, self.sin = rope.cos_sin(positions)
        self.start, self.length = self.length, self.length + T
        self.mask = None if T == 1 else causal_mask(T, self.length, positions.device)

    def attend(self, layer: int, q, k, v):
        q, k = rotate(q, self.cos, self.sin), rotate(k, self.cos, self.sin)
        s, e = self.start, self.length
        self.k[layer, :, :, s:e] = k
        self.v[layer, :, :, s:e] = v
        if self.last_q is None:
            self.last_q = q.new_zeros((self.k.shape[0],) + q[:, :, -1].shape)
        self.last_q[layer] = q[:, :, -1]
        return attend(q, self.k[layer, :, :, :e], self.v[layer, :, :, :e], self.mask)

    def rollback(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot roll back {n} of {self.length} tokens")
        self.length -= n
