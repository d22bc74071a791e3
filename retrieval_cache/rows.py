"""Dropping batch rows from a cache: the one operation every cache shares for a shrinking batch."""
import torch


class BatchRows:
    ROWS: dict = {}  # attribute name -> its batch axis

    def keep(self, rows: list) -> None:
        """Keep only these batch rows, in this order (copies each batched tensor once)."""
        for name, axis in self.ROWS.items():
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(axis, torch.tensor(rows, device=t.device)))
