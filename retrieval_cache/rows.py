"""Batch rows of a cache: dropping finished rows, and appending the rows of another cache of the same shape
(continuous batching: a prefilled sequence joins a batch that is decoding)."""
import torch


class BatchRows:
    ROWS: dict = {}  # attribute name -> its batch axis

    def keep(self, rows: list) -> None:
        """Keep only these batch rows, in this order (copies each batched tensor once)."""
        for name, axis in self.ROWS.items():
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(axis, torch.tensor(rows, dtype=torch.long, device=t.device)))

    def join(self, other: "BatchRows") -> None:
        """Append other's rows after this cache's (same class and sizes but the batch; copies each batched
        tensor once)."""
        for name, axis in self.ROWS.items():
            a, b = getattr(self, name), getattr(other, name)
            if (a is None) != (b is None):
                raise ValueError(f"cannot join caches: '{name}' is set in one of them only")
            if a is not None:
                setattr(self, name, torch.cat([a, b.to(a.device)], dim=axis))
