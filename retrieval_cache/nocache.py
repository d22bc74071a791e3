"""NoCache: causal attention within the current forward's tokens, nothing kept (training, one-shot scoring)."""
from .attention import attend, causal_mask, rotate


class NoCache:
    step = None  # no one-call numba step (FullCache.step)

    def begin(self, positions, rope) -> None:
        T = positions.shape[1]
        self.cos, self.sin = rope.cos_sin(positions)  # [B, T, D]
        self.mask = causal_mask(T, T, positions.device)

    def attend(self, layer: int, q, k, v):  # q [B, Hq, T, D]; k, v [B, Hkv, T, D], before RoPE
        return attend(rotate(q, self.cos, self.sin), rotate(k, self.cos, self.sin), v, self.mask)
