"""PagedCache: the FullCache protocol over fixed-size KV blocks of a shared BlockPool (paged attention).

BlockPool: k, v [layers, n_blocks, bs, Hkv, D] and a free list. Row b's slot p lives in block tables[b][p // bs],
at offset p % bs. A row takes blocks from the pool as its forwards reach new slots and gives them back when it
leaves the batch (keep) or the cache is released, so the memory held follows the tokens held, not the longest row.
Rolling back stays a count: a rejected draft's slot keeps its block and is rewritten by the accepted tokens.
Attention (attention.attend_paged) reads the blocks in place through the table with the numba CPU kernel; other
kernels get a step's blocks gathered into one tensor per layer; slots past a row's own end (a shorter row's
padding blocks) are masked by position, as in FullCache.
"""
import math

import torch

from .attention import attend_paged, paged_step, rotate


class PoolFull(RuntimeError):
    """The pool has fewer free blocks than a step needs."""


class BlockPool:
    """k, v [layers, n_blocks, bs, Hkv, D]. A pool short of blocks grows by 1/GROWTH of its size (at least what is
    asked), up to `limit` blocks; past that, take() raises PoolFull. Growing copies the pool once."""
    GROWTH = 8

    def __init__(self, n_layers, n_kv_heads, head_dim, block: int, n_blocks: int, dtype=torch.float32, device=None,
                 limit: int | None = None):
        if block < 1 or n_blocks < 1:
            raise ValueError(f"a block pool needs block >= 1 and n_blocks >= 1 (got {block}, {n_blocks})")
        shape = (n_layers, n_blocks, block, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block, self.limit = block, max(n_blocks, limit or n_blocks)
        self.free = list(range(n_blocks - 1, -1, -1))  # pop() hands out the lowest ids first

    @property
    def n_blocks(self) -> int:
        return self.k.shape[1]

    def take(self, n: int) -> list:
        if n > len(self.free):
            self.grow(n - len(self.free))
        return [self.free.pop() for _ in range(n)]

    def grow(self, need: int) -> None:
        n = self.n_blocks
        more = min(self.limit - n, max(need, n // self.GROWTH))
        if more < need:
            raise PoolFull(f"KV block pool exhausted: {need} more blocks needed, {self.limit} blocks at most")
        grown = lambda t: torch.cat([t, t.new_zeros((t.shape[0], more) + t.shape[2:])], dim=1)  # noqa: E731
        self.k, self.v = grown(self.k), grown(self.v)
        self.free = list(range(n + more - 1, n - 1, -1)) + self.free

    def give(self, blocks: list) -> None:
        self.free += blocks

    def blocks_for(self, slots: int) -> int:
        return math.ceil(slots / self.block)

    @property
    def bytes(self) -> int:
        """What the pool reserves."""
        return 2 * self.k.numel() * self.k.element_size()


class PagedCache:
    """Same protocol as FullCache (begin, attend, keep, join, settle, last_q; chunk_keys, gather_chunks, at), rows
    of at most max_len slots. `static` (CUDA graphs) is not supported: a step may take blocks (a host decision)."""
    store = None

    def __init__(self, pool: BlockPool, max_len: int, batch: int = 1):
        self.pool, self.max_len = pool, max_len
        self.tables = [[] for _ in range(batch)]
        self.static = False
        self.last_q = None  # [layers, B, Hq, D], as FullCache's
        self.step = None  # as FullCache's

    @property
    def shape(self) -> tuple:
        L, _, _, Hkv, D = self.pool.k.shape  # pool: [layers, n_blocks, bs, Hkv, D]
        return L, len(self.tables), Hkv, self.max_len, D

    @property
    def device(self):
        return self.pool.k.device

    @property
    def dtype(self):
        return self.pool.k.dtype

    @property
    def blocks_held(self) -> int:
        return sum(map(len, self.tables))

    def grow(self, row: int, slots: int) -> None:
        """Row b holds blocks for its first `slots` slots."""
        need = self.pool.blocks_for(slots) - len(self.tables[row])
        if need > 0:
            self.tables[row] += self.pool.take(need)

    def table(self, n: int) -> torch.Tensor:
        """Block ids [B, n] of each row's first n blocks (a row with fewer repeats its last one: masked slots)."""
        pad = lambda t: (t + t[-1:] * n)[:n] if t else [0] * n  # noqa: E731
        return torch.tensor([pad(t) for t in self.tables], dtype=torch.long, device=self.device)

    def begin(self, positions: torch.Tensor, rope) -> None:
        if self.static:
            raise ValueError("a PagedCache cannot run fixed-shape (CUDA graph) steps")
        self.cos, self.sin = rope.cos_sin(positions)
        self.positions = positions
        last = positions[:, -1].tolist()  # rows are non-decreasing
        self.end = max(last) + 1
        if self.end > self.max_len:
            raise ValueError(f"PagedCache overflow: position {self.end - 1} >= capacity {self.max_len}")
        for b, p in enumerate(last):
            self.grow(b, p + 1)
        bs = self.pool.block
        self.idx = self.table(self.pool.blocks_for(self.end))  # [B, nb]
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        self.blk, self.off = self.idx[rows, positions // bs], positions % bs  # [B, T]: where each new token goes
        self.limits = positions + 1  # [B, T]: the query at position p sees slots 0 .. p
        if positions.shape[1] == 1 and min(last) == self.end - 1:
            self.mask = None
        else:  # [B, 1, T, end]: slot s visible to the query at position p iff s <= p
            self.mask = (torch.arange(self.end, device=positions.device) <= positions[:, :, None])[:, None]
        self.step = None if self.last_q is None else paged_step(self.cos, self.sin, positions, self.limits,
                                                                self.pool.k, self.pool.v, self.idx, self.last_q)

    def attend(self, layer: int, q, k, v):
        if self.step is not None:
            return self.step.attend(layer, q, k, v)
        if self.last_q is None:
            self.last_q = q.new_zeros((self.pool.k.shape[0],) + q[:, :, -1].shape)
        K, V = self.pool.k[layer], self.pool.v[layer]  # [n_blocks, bs, Hkv, D]
        q, k = rotate(q, self.cos, self.sin), rotate(k, self.cos, self.sin)
        K[self.blk, self.off] = k.transpose(1, 2)  # [B, T, Hkv, D]
        V[self.blk, self.off] = v.transpose(1, 2)
        self.last_q[layer] = q[:, :, -1]
        return attend_paged(q, K, V, self.idx, self.end, self.mask, self.limits)

    def settle(self) -> None:
        pass

    def keep(self, rows: list) -> None:
        for r in set(range(len(self.tables))) - set(rows):
            self.pool.give(self.tables[r])
        self.tables = [self.tables[r] for r in rows]
        if self.last_q is not None:
            self.last_q = self.last_q[:, rows]

    def join(self, other: "PagedCache") -> None:
        """Append other's rows; their blocks (of the same pool) become this cache's."""
        if other.pool is not self.pool or other.max_len != self.max_len:
            raise ValueError("cannot join PagedCaches of different pools or capacities")
        if (self.last_q is None) != (other.last_q is None):
            raise ValueError("cannot join caches: 'last_q' is set in one of them only")
        self.tables += other.tables
        other.tables = []
        if self.last_q is not None:
            self.last_q = torch.cat([self.last_q, other.last_q], dim=1)

    def release(self) -> None:
        """Every block back to the pool (the cache is dropped)."""
        self.keep([])

    # Reading by chunk and by position (RetrievalCache.select, StreamingCache.fill_from) through the block table.
    def chunk_keys(self, layer: int, c: int, lo: int, hi: int) -> torch.Tensor:
        """Keys of chunks lo..hi-1 of c slots (a multiple of the block), every row: [B, Hkv, hi - lo, c, D]."""
        m = self.chunk_blocks(c)
        K = self.pool.k[layer][self.table(hi * m)[:, lo * m :]]  # [B, (hi - lo) m, bs, Hkv, D]
        B, _, bs, Hkv, D = K.shape
        return K.view(B, hi - lo, c, Hkv, D).permute(0, 3, 1, 2, 4)

    def gather_chunks(self, layer: int, idx: torch.Tensor, c: int) -> tuple:
        """k, v [B, Hkv, n * c, D] of chunks idx [B, Hkv, n]."""
        m = self.chunk_blocks(c)
        B, Hkv, n = idx.shape
        table, dev = self.table(int(idx.max()) * m + m), idx.device
        blk = table[torch.arange(B, device=dev)[:, None, None, None], idx[..., None] * m + torch.arange(m, device=dev)]
        h = torch.arange(Hkv, device=dev)[None, :, None, None]  # blk: [B, Hkv, n, m] block ids
        # t[layer][blk, :, h]: [B, Hkv, n, m, bs, D]
        return tuple(t[layer][blk, :, h].reshape(B, Hkv, n * c, -1) for t in (self.pool.k, self.pool.v))

    def at(self, row: int, positions: torch.Tensor) -> tuple:
        """k, v [layers, Hkv, n, D] of row's slots at positions [n] (a CPU index)."""
        blk = torch.tensor(self.tables[row], dtype=torch.long)[positions // self.pool.block]
        off = positions % self.pool.block
        return tuple(t[:, blk, off].permute(0, 2, 1, 3) for t in (self.pool.k, self.pool.v))  # [L, n, Hkv, D] first

    def chunk_blocks(self, c: int) -> int:
        if c % self.pool.block:
            raise ValueError(f"the KV block ({self.pool.block} tokens) must divide the retrieval chunk size ({c})")
        return c // self.pool.block
