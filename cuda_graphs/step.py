"""StepGraphs: one CUDA graph per input shape of a fixed-shape step, replayed with new inputs; eager elsewhere.

fn(*inputs) -> tensor must have, for a given input shape, a fixed shape and no host sync (a cache in static mode).
The first call of a shape warms fn up on a side stream (its writes are the step's own), captures it into one
memory pool shared by every StepGraphs, and replays it; later calls of that shape copy their inputs into the
graph's static buffers and replay. With enabled=False, or inputs that are not on a CUDA device, every call is
fn(*inputs): the same step, eagerly (how the CPU tests check it against the plain forward).
The output is the graph's static buffer: read it before the next call of the same shape.
Tensors that fn reads by address (weights, cache buffers) must stay where they were at capture: whoever replaces
them calls reset(). Tensors updated in place (a re-selected retrieval cache) need nothing.
"""
import torch

_pool = None  # the memory pool every graph draws on (torch.cuda.graph_pool_handle)


def capturing(device) -> bool:
    """True while a CUDA graph is being captured on the current stream (host syncs would break it)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


class StepGraphs:
    def __init__(self, fn, enabled: bool = True, max_graphs: int = 64):
        self.fn = fn
        self.enabled = enabled
        self.max_graphs = max_graphs  # shapes beyond this many run eagerly
        self.graphs = {}  # shape key -> (graph, static inputs, static output)
        self.replays = 0

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not inputs[0].is_cuda:
            return self.fn(*inputs)
        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                return self.fn(*inputs)
            self.graphs[key] = self._capture(inputs)
        graph, static_in, static_out = self.graphs[key]
        for buf, x in zip(static_in, inputs):
            buf.copy_(x)
        graph.replay()
        self.replays += 1
        return static_out

    def _capture(self, inputs):
        global _pool
        if _pool is None:
            _pool = torch.cuda.graph_pool_handle()
        static_in = [x.clone() for x in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lazy allocations and kernel selection happen outside the capture
            self.fn(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=_pool):
            static_out = self.fn(*static_in)
        return graph, static_in, static_out

    def reset(self) -> None:
        """Forget every graph (the tensors fn reads were replaced, e.g. a batch shrank)."""
        self.graphs.clear()
