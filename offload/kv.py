"""KVStream: a full KV cache in pinned host memory, streamed to the device one layer at a time.

k, v [layers, B, Hkv, max_len, D] live on the host; two device buffers [B, Hkv, max_len, D] each take one layer.
Per forward over the cache (a verification, a prefill chunk):
  begin()                 writes back the previous forward's new tokens (one device-to-host copy), then starts
                          copying layer 0 into buffer 0 on the copy stream
  fetch(layer)            waits for that layer's copy, starts the next layer's into the other buffer (once the
                          compute that last read it is done), and returns the layer's device buffers
  write(layer, rows, positions, k, v)   remembers the step's new tokens (the caller also writes them into the
                          device buffer, which this step attends to) for the next begin()
Events order the copy stream and the compute stream; the one host sync per forward is the write-back. Without
CUDA the buffers are host tensors and the copies synchronous: the same order, checked by the CPU tests.
A layer is copied whole: a contiguous pinned block copies asynchronously at full speed, where a slice of the
filled slots would be strided; the cache is sized to the prompt plus the new tokens, so little of it is empty.
"""
import torch


class KVStream:
    def __init__(self, shape: tuple, dtype, device):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.k = torch.zeros(shape, dtype=dtype, pin_memory=cuda)  # [layers, B, Hkv, max_len, D]
        self.v = torch.zeros(shape, dtype=dtype, pin_memory=cuda)
        self.buffers = [(torch.empty(shape[1:], dtype=dtype, device=self.device),
                         torch.empty(shape[1:], dtype=dtype, device=self.device)) for _ in range(2)]
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        event = (lambda: torch.cuda.Event()) if cuda else (lambda: None)
        self.ready = [event(), event()]  # buffer b holds its layer's slots
        self.free = [event(), event()]  # the compute that read buffer b is done
        self.pending = []  # (layer, rows, positions, k, v) written by the current forward
        self.copied = 0  # bytes copied host -> device (a benchmark reads it)

    def begin(self) -> None:
        self.flush()
        self._mark_free(0), self._mark_free(1)
        self._load(0)

    def fetch(self, layer: int):
        """Device k, v [B, Hkv, max_len, D] of layer."""
        b = layer % 2
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[b])
        if layer > 0:
            self._mark_free(1 - b)  # layer - 1's attention is enqueued: its buffer frees after it
        if layer + 1 < self.k.shape[0]:
            self._load(layer + 1)
        return self.buffers[b]

    def write(self, layer: int, rows, positions, k, v) -> None:
        self.pending.append((layer, rows, positions, k, v))

    def flush(self) -> None:
        """Copy the pending tokens' k, v to the host (one transfer) and write them into their slots."""
        if not self.pending:
            return
        layers = [p[0] for p in self.pending]
        _, rows, positions, _, _ = self.pending[0]
        k = torch.stack([p[3] for p in self.pending]).cpu()  # [n, B, Hkv, T, D]
        v = torch.stack([p[4] for p in self.pending]).cpu()
        rows, positions = rows.cpu(), positions.cpu()
        for i, layer in enumerate(layers):
            self.k[layer][rows, :, positions] = k[i].transpose(1, 2)
            self.v[layer][rows, :, positions] = v[i].transpose(1, 2)
        self.pending = []

    def _mark_free(self, b: int) -> None:
        if self.copy_stream is not None:
            self.free[b].record(torch.cuda.current_stream(self.device))

    def _load(self, layer: int) -> None:
        b = layer % 2
        kb, vb = self.buffers[b]
        self.copied += 2 * kb.numel() * kb.element_size()
        if self.copy_stream is None:
            kb.copy_(self.k[layer])
            vb.copy_(self.v[layer])
            return
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.free[b])
            kb.copy_(self.k[layer], non_blocking=True)
            vb.copy_(self.v[layer], non_blocking=True)
            self.ready[b].record(self.copy_stream)
