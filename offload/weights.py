"""WeightStream: the weights of a stack of layers in pinned host memory, streamed through two device buffers.

Layer j of the streamed ones computes from buffer j % 2 (its parameters are views into that buffer, so the
forward code does not change). While layer j computes, a copy stream fills the other buffer with layer j + 1:
  pre-hook of j:   the compute stream waits for ready[j] (its copy), then the copy stream waits for the compute
                   event of the layer that last used buffer (j+1) % 2, copies layer j + 1 and records ready[j+1];
  post-hook of j:  the compute stream records done[j].
Events order the two streams; there is no device-wide synchronize. The copy after the last layer is the first
layer of the next forward, so it overlaps whatever runs between forwards. The first `resident` layers stay on
the device. Without CUDA the buffers are ordinary tensors and the copies synchronous: the same order, which the
CPU tests check against the resident model.
"""
import torch
from torch import nn


class WeightStream:
    def __init__(self, layers: nn.ModuleList, device, resident: int = 0):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        for layer in layers[:resident]:
            layer.to(self.device)
        self.layers = list(layers[resident:])
        if len(self.layers) < 2:  # one streamed layer would reload itself: keep it on the device instead
            for layer in self.layers:
                layer.to(self.device)
            self.layers = []
            return
        params = [list(layer.parameters()) for layer in self.layers]
        dtypes = {p.dtype for ps in params for p in ps}
        if len(dtypes) != 1:
            raise ValueError(f"streamed layers must share one dtype (got {sorted(map(str, dtypes))})")
        dtype = dtypes.pop()
        # host[j]: layer j's parameters, flat and pinned [numel_j]
        self.host = [torch.cat([p.detach().reshape(-1).cpu() for p in ps]) for ps in params]
        if cuda:
            self.host = [h.pin_memory() for h in self.host]
        size = max(h.numel() for h in self.host)
        self.buffers = [torch.empty(size, dtype=dtype, device=self.device) for _ in range(2)]
        for j, ps in enumerate(params):  # layer j's parameters become views into buffer j % 2
            off = 0
            for p in ps:
                p.data = self.buffers[j % 2][off : off + p.numel()].view(p.shape)
                off += p.numel()
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        event = (lambda: torch.cuda.Event()) if cuda else (lambda: None)
        self.ready = [event() for _ in self.layers]  # copy of layer j into its buffer finished
        self.done = [event() for _ in self.layers]  # compute of layer j finished (its buffer may be overwritten)
        self.copies = 0
        for j, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(lambda m, a, j=j: self._before(j))
            layer.register_forward_hook(lambda m, a, out, j=j: self._after(j))
        self._load(0, after=None)

    def _load(self, j: int, after) -> None:
        """Copy layer j into buffer j % 2 once the compute behind event `after` (the buffer's last user) is done."""
        buf, host = self.buffers[j % 2], self.host[j]
        self.copies += 1
        if self.copy_stream is None:
            buf[: host.numel()].copy_(host)
            return
        with torch.cuda.stream(self.copy_stream):
            if after is not None:
                self.copy_stream.wait_event(after)
            buf[: host.numel()].copy_(host, non_blocking=True)
            self.ready[j].record(self.copy_stream)

    def _before(self, j: int) -> None:
        n = len(self.layers)
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[j])
        nxt = (j + 1) % n
        if nxt % 2 != j % 2:  # the other buffer: free once its last user, layer j - 1 (cyclically), is done
            self._load(nxt, self.done[(j - 1) % n])

    def _after(self, j: int) -> None:
        n = len(self.layers)
        if self.copy_stream is not None:
            self.done[j].record(torch.cuda.current_stream(self.device))
        nxt = (j + 1) % n
        if nxt % 2 == j % 2:  # odd count, last layer: the next forward's first layer reuses this buffer
            self._load(nxt, self.done[j])

    def host_parameters(self) -> dict:
        """Each streamed parameter -> its values in host memory (a view of its layer's flat copy): what the
        parameter holds once its layer is loaded (its own data is a view of a shared device buffer)."""
        out = {}
        for layer, host in zip(self.layers, self.host):
            off = 0
            for p in layer.parameters():
                out[p] = host[off : off + p.numel()].view(p.shape)
                off += p.numel()
        return out

    @property
    def streamed(self) -> int:
        return len(self.layers)
