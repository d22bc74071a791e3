"""RetrievalCache: the top-k KV chunks of a FullCache for the current query, plus a tail for new tokens.

Selection (TriForce): split the full cache into chunks of c tokens; per layer and kv head,
  score[chunk] = Σ_{g in group} q_g · mean_k[chunk]        (q after RoPE, GQA group of G query heads)
keep chunk 0 (the attention sink) and the best budget//c - 1 others, and gather them into a dense buffer.
Keys keep the RoPE of their true positions, so relative distances stay exact.
The tail holds tokens processed after selection (speculative, then accepted); rollback moves its length.
"""
import torch

from .attention import attend, causal_mask, rotate


class RetrievalCache:
    def __init__(self, n_layers, n_kv_heads, head_dim, budget, chunk_size, tail, batch=1, dtype=torch.float32, device=None):
        if chunk_size < 1 or budget < chunk_size:
            raise ValueError(f"retrieval budget {budget} must hold at least one chunk of {chunk_size} tokens")
        if tail < 1:
            raise ValueError(f"retrieval tail must hold at least one token (got {tail})")
        self.c, self.n_sel, self.tail = chunk_size, budget // chunk_size, tail
        self.sel_len = self.n_sel * chunk_size
        shape = (n_layers, batch, n_kv_heads, self.sel_len + tail, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.chunks = None  # selected chunk ids [layers, B, Hkv, n_sel], ascending
        self.length = 0  # tokens in the tail

    @torch.no_grad()
    def select(self, full, q=None) -> None:
        """Re-gather from `full` (a FullCache) scored by q [layers, B, Hq, D] (default: full.last_q). Empties the tail."""
        q = full.last_q if q is None else q
        Lyr, B, Hkv, max_len, D = full.k.shape
        c, L = self.c, full.length
        if max_len % c:
            raise ValueError(f"FullCache capacity {max_len} must be a multiple of the chunk size {c}")
        n_chunks = -(-L // c)
        n_sel = min(self.n_sel, n_chunks)
        G = q.shape[2] // Hkv
        counts = torch.full((n_chunks,), c, device=full.k.device)
        counts[-1] = L - (n_chunks - 1) * c
        pos = torch.arange(n_chunks * c, device=full.k.device).view(n_chunks, c)
        self.chunks = torch.zeros(Lyr, B, Hkv, self.n_sel, dtype=torch.long, device=full.k.device)
        for layer in range(Lyr):
            kc = full.k[layer].view(B, Hkv, max_len // c, c, D)[:, :, :n_chunks]
            kc = kc * (pos < L)[None, None, :, :, None]  # zero the stale slots of a partial last chunk
            mean_k = kc.sum(3) / counts[:, None]  # [B, Hkv, n_chunks, D]
            score = torch.einsum("bhgd,bhnd->bhn", q[layer].view(B, Hkv, G, D).to(mean_k.dtype), mean_k)
            score[..., 0] = float("inf")  # chunk 0 always kept
            idx = score.topk(n_sel, dim=-1).indices.sort(dim=-1).values  # [B, Hkv, n_sel]
            self.chunks[layer, ..., :n_sel] = idx
            # index_select over whole chunks: flat id = (b*Hkv + h) * chunks_per_row + chunk
            rows = torch.arange(B * Hkv, device=idx.device).view(B, Hkv, 1) * (max_len // c)
            flat = (rows + idx).reshape(-1)
            for src, dst in ((full.k, self.k), (full.v, self.v)):
                g = src[layer].reshape(-1, c, D).index_select(0, flat)
                dst[layer, :, :, : n_sel * c] = g.view(B, Hkv, n_sel * c, D)
        # Gathered slots beyond the cache length (a partial last chunk, or fewer chunks than n_sel) are masked.
        slot_pos = self.chunks[..., None] * c + torch.arange(c, device=full.k.device)  # [Lyr, B, Hkv, n_sel, c]
        self.valid = (slot_pos < L).reshape(Lyr, B, Hkv, self.sel_len)
        self.valid[..., n_sel * c :] = False
        self.all_valid = bool(self.valid.all())
        self.length = 0

    def begin(self, positions: torch.Tensor, rope) -> None:
        T = positions.shape[1]
        if self.chunks is None:
            raise ValueError("RetrievalCache.select must run before the first step")
        if self.length + T > self.tail:
            raise ValueError(f"RetrievalCache tail overflow: {self.length} + {T} > {self.tail}")
        self.cos, self.sin = rope.cos_sin(positions)
        self.start, self.length = self.length, self.length + T
        if T == 1 and self.all_valid:
            self.mask = None
        else:  # [Lyr, B, Hkv, T, sel_len + length]: valid gathered slots, causal over the tail
            Lyr, B, Hkv, _ = self.valid.shape
            sel_vis = self.valid[:, :, :, None, :].expand(Lyr, B, Hkv, T, self.sel_len)
            tail_vis = causal_mask(T, self.length, positions.device).expand(Lyr, B, Hkv, T, self.length)
            self.mask = torch.cat([sel_vis, tail_vis], dim=-1)

    def attend(self, layer: int, q, k, v):
        q, k = rotate(q, self.cos, self.sin), rotate(k, self.cos, self.sin)
        s, e = self.sel_len + self.start, self.sel_len + self.length
        self.k[layer, :, :, s:e] = k
        self.v[layer, :, :, s:e] = v
        mask = None if self.mask is None else self.mask[layer]
        return attend(q, self.k[layer, :, :, :e], self.v[layer, :, :, :e], mask)

    def rollback(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot roll back {n} of {self.length} tail tokens")
        self.length -= n
