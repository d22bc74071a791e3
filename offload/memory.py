"""A cap on this process's GPU memory, so that a large GPU stands in for a smaller card (e.g. 24 GB)."""
import torch


def cap_memory(gigabytes: float, device="cuda") -> float:
    """Limit the caching allocator to `gigabytes` GiB on device; returns the fraction of the card set.
    Allocations past the cap raise torch.OutOfMemoryError as on a card of that size."""
    device = torch.device(device)
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = gigabytes * 2**30 / total
    if not 0 < fraction <= 1:
        raise ValueError(f"a cap of {gigabytes} GiB does not fit this GPU ({total / 2**30:.1f} GiB)")
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction
