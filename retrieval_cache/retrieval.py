"""RetrievalCache: the top-k KV chunks of a FullCache for the current query, plus a tail for new tokens.

Selection (TriForce): split each row's first F_b = c * (L_b // c) tokens (its whole chunks) into chunks of c; per
layer and kv head,
  score[chunk] = Σ_{g in group} q_g · mean_k[chunk]        (q after RoPE, GQA group of G query heads)
keep chunk 0 (the attention sink) and the best budget//c - 1 others, and gather them into a dense buffer.
Keys keep the RoPE of their true positions, so relative distances stay exact.
The tail holds the rest, by position: tail slot j of row b is position F_b + j, so the L_b - F_b < c tokens of a
partial last chunk are copied there at selection (always attended, as the most recent tokens), and the tokens
processed after selection follow them. Every gathered slot then holds a token whenever each row has budget//c whole
chunks (the default budget is at most 1/8 of the prompt), so a query sees a prefix of the slots and the one-call
kernel takes the step (cpu_attention.Step); a gathered partial chunk would hide slots in the middle, which only a
mask (SDPA) can.
Re-selection (a refresh) re-reads only the chunks at or past the last select's shortest row: a chunk wholly
below every row's length holds committed tokens, which never change, so its mean key is kept.
"""
import torch

from .attention import attend, rotate, view_step
from .rows import BatchRows


class RetrievalCache(BatchRows):
    ROWS = {"k": 1, "v": 1, "chunks": 1, "valid": 1, "base": 0, "mean_k": 1}

    def __init__(self, n_layers, n_kv_heads, head_dim, budget, chunk_size, tail, batch=1, dtype=torch.float32, device=None):
        if chunk_size < 1 or budget < chunk_size:
            raise ValueError(f"retrieval budget {budget} must hold at least one chunk of {chunk_size} tokens")
        if tail < 1:
            raise ValueError(f"retrieval tail must hold at least one token (got {tail})")
        # tail: tokens fed after a selection, plus the up to c - 1 of a partial last chunk
        self.c, self.n_sel, self.tail = chunk_size, budget // chunk_size, tail + chunk_size - 1
        self.sel_len = self.n_sel * chunk_size
        shape = (n_layers, batch, n_kv_heads, self.sel_len + self.tail, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.chunks = self.valid = self.base = None  # set by select
        # Chunk-mean keys of the FullCache last selected from: [layers, B, Hkv, max_len // c, D], where `full` lives;
        # chunks [0, final) hold committed tokens of every row and are not re-read.
        self.mean_k, self.source, self.final = None, None, 0
        self.static = False  # shape-fixed, sync-free begin() (CUDA graphs): the whole tail is attended, masked
        self.step = None  # as FullCache's

    @torch.no_grad()
    def select(self, full, lengths: list, q=None) -> None:
        """Re-gather from `full` (a FullCache) whose row b holds lengths[b] tokens, scored by q [layers, B, Hq, D]
        (default: full.last_q). The tail starts again at position lengths[b].
        Scoring and gathering run where full's k, v live (host memory for an offloaded cache); only the selected
        chunks reach this cache's device."""
        full.settle()
        q = full.last_q if q is None else q
        Lyr, B, Hkv, max_len, D = full.shape
        c, dev, own = self.c, full.device, self.k.device
        if max_len % c:
            raise ValueError(f"FullCache capacity {max_len} must be a multiple of the chunk size {c}")
        whole = [n // c * c for n in lengths]  # F_b: the tokens of row b's whole chunks
        L = torch.tensor(whole, device=dev)  # [B]
        n_chunks = max(whole) // c
        n_sel = min(self.n_sel, n_chunks)
        G = q.shape[2] // Hkv
        live = torch.arange(n_chunks, device=dev) * c < L[:, None]  # [B, n_chunks]: the row's whole chunks
        if self.chunks is None or self.chunks.shape[1] != B:  # else re-selected in place: captured graphs stay bound
            self.chunks = torch.zeros(Lyr, B, Hkv, self.n_sel, dtype=torch.long, device=own)
            self.valid = torch.zeros(Lyr, B, Hkv, self.sel_len, dtype=torch.bool, device=own)
            self.base = torch.zeros(B, dtype=torch.long, device=own)
        self.chunks.zero_()
        if full is not self.source or self.mean_k.shape[1] != B or min(whole) // c < self.final:
            self.mean_k = torch.zeros(Lyr, B, Hkv, max_len // c, D, dtype=full.dtype, device=dev)
            self.source, self.final = full, 0
        lo = self.final  # chunks lo .. n_chunks-1 are (re)averaged
        for layer in range(Lyr):  # one layer at a time: a first select reads every key
            self.mean_k[layer, :, :, lo:n_chunks] = full.chunk_keys(layer, c, lo, n_chunks).mean(3)
        mean_k = self.mean_k[:, :, :, :n_chunks]  # [Lyr, B, Hkv, n_chunks, D]
        score = torch.einsum("lbhgd,lbhnd->lbhn", q.reshape(Lyr, B, Hkv, G, D).to(dev, mean_k.dtype), mean_k)
        score.masked_fill_(~live[None, :, None], float("-inf"))  # chunks past a shorter row's whole ones
        score[..., :1] = float("inf")  # chunk 0 always kept
        idx = score.topk(n_sel, dim=-1).indices.sort(dim=-1).values  # [Lyr, B, Hkv, n_sel]
        self.chunks[..., :n_sel] = idx
        # then the chunk of each row's last token: its partial chunk, if any (else a whole one, whose copy nothing
        # sees), for tail slots 0 .. L_b - F_b - 1 (the rest: stale, unseen)
        part = ((torch.tensor(lengths, device=dev) - 1) // c).clamp(min=0).view(1, B, 1, 1).expand(Lyr, B, Hkv, 1)
        idx = torch.cat([idx, part], dim=-1)
        n = n_sel * c
        tail = slice(self.sel_len, self.sel_len + c)
        for layer in range(Lyr):  # one layer at a time (small temporaries)
            k, v = full.gather_chunks(layer, idx[layer], c)  # [B, Hkv, n + c, D]
            self.k[layer, :, :, :n], self.k[layer, :, :, tail] = k[:, :, :n], k[:, :, n:]
            self.v[layer, :, :, :n], self.v[layer, :, :, tail] = v[:, :, :n], v[:, :, n:]
        # Gathered slots past a row's whole chunks (a row with fewer than n_sel of them) are masked.
        slot_pos = self.chunks[..., None] * c + torch.arange(c, device=own)  # [Lyr, B, Hkv, n_sel, c]
        L = L.to(own)
        self.valid.copy_((slot_pos < L[None, :, None, None, None]).reshape(Lyr, B, Hkv, self.sel_len))
        self.valid[..., n_sel * c :] = False
        self.all_valid = bool(self.valid.all())  # a later keep() only drops rows, so it stays a safe answer
        self.base.copy_(L)
        self.final = min(whole) // c

    def join(self, other: "RetrievalCache") -> None:
        """Append other's rows (selected from their own FullCache, with the same budget, chunk and tail sizes).
        The chunk means stay valid: the joined rows' FullCache rows hold the same keys once joined to the batch's."""
        if (other.c, other.n_sel, other.tail) != (self.c, self.n_sel, self.tail):
            raise ValueError("cannot join RetrievalCaches of different budget, chunk size or tail")
        if self.chunks is None or other.chunks is None:
            raise ValueError("RetrievalCache.select must run before a join")
        super().join(other)
        self.all_valid = self.all_valid and other.all_valid
        self.final = min(self.final, other.final)

    def begin(self, positions: torch.Tensor, rope) -> None:
        if self.chunks is None:
            raise ValueError("RetrievalCache.select must run before the first step")
        B, T = positions.shape
        self.slots = positions - self.base[:, None]  # [B, T] tail slots
        if self.static:
            first, last = [0], [self.tail - 1]
        else:
            first, last = self.slots[:, [0, -1]].T.tolist()  # one host sync for both bounds
        self.end = max(last) + 1
        if min(first) < 0 or self.end > self.tail:
            raise ValueError(f"RetrievalCache tail overflow: tail slot {self.end - 1} of {self.tail}")
        self.cos, self.sin = rope.cos_sin(positions)
        self.rows = torch.arange(B, device=positions.device)[:, None]
        # Every gathered slot valid: a query sees the selection, then the tail up to its own slot (a prefix).
        self.limits = self.sel_len + self.slots + 1 if self.all_valid else None  # [B, T]
        if T == 1 and min(last) == self.end - 1 and self.all_valid and not self.static:
            self.mask = None
        else:  # [Lyr, B, Hkv, T, sel_len + end]: valid gathered slots, then tail slots up to the query's own
            Lyr, _, Hkv, _ = self.valid.shape
            sel_vis = self.valid[:, :, :, None, :].expand(Lyr, B, Hkv, T, self.sel_len)
            tail_vis = torch.arange(self.end, device=positions.device) <= self.slots[:, :, None]  # [B, T, end]
            self.mask = torch.cat([sel_vis, tail_vis[None, :, None].expand(Lyr, B, Hkv, T, self.end)], dim=-1)
        self.step = view_step(self.cos, self.sin, self.sel_len + self.slots, self.limits, self.k, self.v)

    def attend(self, layer: int, q, k, v):
        if self.step is not None:
            return self.step.attend(layer, q, k, v)
        slots = self.sel_len + self.slots
        q, k = rotate(q, self.cos, self.sin), rotate(k, self.cos, self.sin)
        self.k[layer][self.rows, :, slots] = k.transpose(1, 2)
        self.v[layer][self.rows, :, slots] = v.transpose(1, 2)
        e = self.sel_len + self.end
        mask = None if self.mask is None else self.mask[layer]
        return attend(q, self.k[layer, :, :, :e], self.v[layer, :, :, :e], mask, self.limits)
