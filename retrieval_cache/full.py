"""FullCache: every token, preallocated. The target's cache."""
import torch

from .attention import attend, rotate, view_step
from .rows import BatchRows


class FullCache(BatchRows):
    """k, v [layers, B, Hkv, max_len, D]; slot p holds the token at position p, after RoPE.

    Protocol shared by all caches (every one is addressed by position, per row):
      begin(positions [B, T], rope)  once per forward: RoPE for the step, which slots are written and visible;
      attend(layer, q, k, v)         per layer, q/k/v before RoPE: writes k, v and returns attention;
      keep(rows)                     drops the other batch rows (a finished sequence leaves the batch);
      join(other)                    appends the rows of a cache of the same sizes (a sequence joins the batch);
      step                           set by begin() where the numba kernel takes the forward's steps: a
                                     cpu_attention.Step that does attend()'s work in one call per layer, on numpy
                                     arrays too (models/kernels.py: Fused); None otherwise.
    static=True makes begin() shape-fixed and free of host syncs, as a captured CUDA graph needs: attention
    runs over every slot, masked by position, and the bounds checks are left to the caller.
    There is no length: a query at position p sees the slots of positions <= p, so a rejected draft's slots are
    invisible to every later query until the accepted tokens overwrite them. Rolling back is the caller's
    bookkeeping (its count of tokens held) and moves no data. A row's last tokens may be repeated at the same
    positions to pad a ragged batch: they rewrite the same slots with the same values.
    `rope` is any object with cos_sin(positions) -> (cos, sin) [B, T, D].
    """
    ROWS = {"k": 1, "v": 1, "last_q": 1}

    def __init__(self, n_layers, n_kv_heads, head_dim, max_len, batch=1, dtype=torch.float32, device=None, store=None):
        """store: where k, v live when not on the device, e.g. offload.KVStream(shape, dtype, device) for host memory:
        any object with k, v (the cache) and begin(), fetch(layer) -> device (k, v) of that layer, and
        write(layer, rows, positions, k, v) for the step's new tokens (one batch row; no keep())."""
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.store = store(shape, dtype, device) if store else None
        self.k = self.store.k if store else torch.zeros(shape, dtype=dtype, device=device)
        self.v = self.store.v if store else torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.static = False
        # Post-RoPE query of the last token of the latest step, per layer: [layers, B, Hq, D].
        # RetrievalCache.select scores chunks with it.
        self.last_q = None
        self.step = None  # this forward's steps in one numba call per layer (attention.view_step), or None

    def begin(self, positions: torch.Tensor, rope) -> None:
        self.cos, self.sin = rope.cos_sin(positions)
        self.positions = positions
        self.rows = torch.arange(positions.shape[0], device=positions.device)[:, None]  # [B, 1]
        self.limits = positions + 1  # [B, T]: the query at position p sees slots 0 .. p
        last = [self.max_len - 1] if self.static else positions[:, -1].tolist()  # rows are non-decreasing
        self.end = max(last) + 1
        if self.end > self.max_len:
            raise ValueError(f"FullCache overflow: position {self.end - 1} >= capacity {self.max_len}")
        if self.store:
            self.store.begin()
        # the numba kernel's one call per layer (once last_q exists: a first forward allocates it)
        no_step = self.store or self.last_q is None
        self.step = None if no_step else view_step(self.cos, self.sin, positions, self.limits, self.k, self.v,
                                                   self.last_q)
        # one token of one row: written by a slice copy (cheaper than an index_put on the CPU)
        self.slot = slice(last[0], last[0] + 1) if positions.shape == (1, 1) and not self.static else None
        if positions.shape[1] == 1 and min(last) == self.end - 1 and not self.static:
            self.mask = None  # one token per row, all at the same position: every slot up to it is visible
        else:  # [B, 1, T, end]: slot s visible to the query at position p iff s <= p
            self.mask = (torch.arange(self.end, device=positions.device) <= positions[:, :, None])[:, None]

    def begin_tree(self, positions: torch.Tensor, rope, anc: torch.Tensor) -> None:
        """A tree-shaped step (ReDrafter's dynamic tree attention). Token 0 of row b is its root, at its true slot
        r = positions[b, 0]; token t > 0 is a tree node at RoPE position positions[b, t] (r + its depth) but in the
        scratch slot r + t, and sees the slots before r and the step's tokens u with anc[b, t, u] (its ancestors and
        itself; anc [B, T, T] bool). Once verified, move() brings the accepted path to the slots of its positions."""
        if self.store:
            raise ValueError("a KV cache offloaded to host memory takes no tree steps")
        B, T = positions.shape
        self.cos, self.sin = rope.cos_sin(positions)
        self.rows = torch.arange(B, device=positions.device)[:, None]
        root = positions[:, :1]  # [B, 1]
        self.positions = root + torch.arange(T, device=positions.device)  # [B, T]: the slots written
        self.limits, self.end = None, int(self.positions.max()) + 1  # not a prefix: the mask says
        self.slot = self.step = None
        if self.end > self.max_len:
            raise ValueError(f"FullCache overflow: slot {self.end - 1} >= capacity {self.max_len}")
        s = torch.arange(self.end, device=positions.device)
        off = (s - root).clamp(0, T - 1)[:, None].expand(B, T, -1)  # [B, T, end]: step token of each slot
        step = (s >= root)[:, None] & (s < root + T)[:, None]
        self.mask = ((s < root)[:, None] | step & anc.gather(2, off))[:, None]  # [B, 1, T, end]

    def move(self, row: int, src: list, dst: list) -> None:
        """Row's slots src -> slots dst, every layer (an accepted tree path to its true slots; the sources are read
        before any destination is written)."""
        if src != dst:
            s, d = torch.tensor(src, device=self.k.device), torch.tensor(dst, device=self.k.device)
            for t in (self.k, self.v):
                t[:, row, :, d] = t[:, row, :, s]

    def join(self, other: "FullCache") -> None:
        if self.store or other.store:
            raise ValueError("a KV cache offloaded to host memory holds one sequence: it cannot join a batch")
        if other.max_len != self.max_len:
            raise ValueError(f"cannot join FullCaches of {self.max_len} and {other.max_len} slots")
        super().join(other)

    # Reading the cache by chunk and by position (RetrievalCache.select, StreamingCache.fill_from); a PagedCache
    # answers the same calls through its block table.
    @property
    def shape(self) -> tuple:
        """(layers, B, Hkv, max_len, D)"""
        return tuple(self.k.shape)

    @property
    def device(self):  # where k, v live (host memory for an offloaded cache)
        return self.k.device

    @property
    def dtype(self):
        return self.k.dtype

    def chunk_keys(self, layer: int, c: int, lo: int, hi: int) -> torch.Tensor:
        """Keys of chunks lo..hi-1 of c slots, every row: [B, Hkv, hi - lo, c, D] (a view)."""
        L, B, Hkv, max_len, D = self.k.shape
        return self.k[layer].view(B, Hkv, max_len // c, c, D)[:, :, lo:hi]

    def gather_chunks(self, layer: int, idx: torch.Tensor, c: int) -> tuple:
        """k, v [B, Hkv, n * c, D] of chunks idx [B, Hkv, n] (chunk j: slots j*c .. j*c + c - 1)."""
        L, B, Hkv, max_len, D = self.k.shape
        flat = (torch.arange(B * Hkv, device=idx.device).view(B, Hkv, 1) * (max_len // c) + idx).view(-1)
        return tuple(t[layer].view(-1, c, D).index_select(0, flat).view(B, Hkv, -1, D) for t in (self.k, self.v))

    def at(self, row: int, positions: torch.Tensor) -> tuple:
        """k, v [layers, Hkv, n, D] of row's slots at positions [n] (a CPU index)."""
        return self.k[:, row, :, positions], self.v[:, row, :, positions]

    def settle(self) -> None:
        """Make k, v hold every token written so far (a store writes the latest step back lazily)."""
        if self.store:
            self.store.flush()

    def attend(self, layer: int, q, k, v):
        if self.step is not None:
            return self.step.attend(layer, q, k, v)
        if self.last_q is None:
            self.last_q = q.new_zeros((self.k.shape[0],) + q[:, :, -1].shape)
        q, k = rotate(q, self.cos, self.sin), rotate(k, self.cos, self.sin)
        kl, vl = self.store.fetch(layer) if self.store else (self.k[layer], self.v[layer])  # [B, Hkv, max_len, D]
        if self.slot is not None:
            kl[:, :, self.slot] = k
            vl[:, :, self.slot] = v
        else:
            kl[self.rows, :, self.positions] = k.transpose(1, 2)  # [B, T, Hkv, D] into slots positions[b, t]
            vl[self.rows, :, self.positions] = v.transpose(1, 2)
        if self.store:
            self.store.write(layer, self.rows, self.positions, k, v)
        self.last_q[layer] = q[:, :, -1]
        e = self.end
        return attend(q, kl[:, :, :e], vl[:, :, :e], self.mask, self.limits)
