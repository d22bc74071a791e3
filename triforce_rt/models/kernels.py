"""Which matrix kernels a model runs with, and the model's layers for the numba kernels (cpu_kernels).

`torch`: nn.Linear over fp32 (or bf16/fp16) weights; a GGUF file is dequantized once into an fp32 folder.
`numba`: cpu_kernels.Linear in place of every nn.Linear and the head. A GGUF file's Q4_0/Q4_1/Q8_0 matrices are
read from the file as blocks (no fp32 copy), in transformers' names and row order, so the model is the one the
torch path loads, value for value; other folders keep their fp32 weights. A block's decode and verify steps then
run as two numba calls around the cache's attend (Fused), not ~30 torch operations and kernel calls.
`auto`: numba for a GGUF whose matrices are all read as blocks, on the CPU in fp32 without --tp; torch otherwise
(benchmarks/results/kernels-cpu.md: on the CPUs measured, torch's fp32 GEMV is already near the memory floor
at one row, while the blocks read 5x fewer bytes).
"""
import numpy as np
import torch
from torch import nn

from cpu_kernels import FORMATS, MAX_ROWS, QK, Blocks, Embedding, Linear, attention_in, attention_out, pack

from ..errors import UserError, first_line
from ..runtime import KERNELS

PLAIN = ("F32", "F16", "BF16")  # GGUF tensor types read as fp32
GGUF_ERRORS = (ValueError, KeyError, IndexError, OSError, EOFError, RuntimeError)  # a file that is not a whole GGUF


def not_gguf(path: str, e: Exception) -> UserError:
    return UserError(f"{path}: not a readable GGUF file ({first_line(e)})")


def gguf_types(path: str) -> set:
    """The tensor types of a GGUF file's matrices (header only)."""
    from gguf import GGUFReader

    try:
        return {t.tensor_type.name for t in GGUFReader(path).tensors if len(t.shape) == 2}
    except GGUF_ERRORS as e:
        raise not_gguf(path, e) from None


def choose(requested: str, device: torch.device, dtype: torch.dtype, gguf: str | None, tp: int = 1) -> str:
    """'torch' or 'numba' for --kernels requested (the one decision); explicit requests that cannot run are errors."""
    if requested not in KERNELS:
        raise UserError(f"unknown --kernels '{requested}' (choose from {', '.join(KERNELS)})")
    unread = sorted(gguf_types(gguf) - set(FORMATS) - set(PLAIN)) if gguf else []
    blockers = [why for bad, why in (
        (device.type != "cpu", "run on the CPU (--device cpu)"),
        (dtype != torch.float32, "compute in float32 (not --dtype " + str(dtype).removeprefix("torch.") + ")"),
        (tp > 1, "do not shard across --tp ranks"),
        (bool(unread), f"read {', '.join(FORMATS)} blocks and F32/F16/BF16 tensors, not {', '.join(unread)}"),
    ) if bad]
    if requested == "numba" and blockers:
        raise UserError(f"--kernels numba: the numba kernels {blockers[0]}; use --kernels torch")
    if requested == "auto":
        return "numba" if gguf and not blockers else "torch"
    return requested


def read_gguf(path: str, hf_cfg) -> dict:
    """HF name -> fp32 tensor or Blocks, for every tensor of a GGUF file, named and row-ordered by transformers'
    own GGUF mapping (for Llama, q and k rows are un-permuted: whole block rows move, so blocks stay blocks)."""
    from gguf import GGUFReader, dequantize
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map)

    reader = GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_cfg)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=hf_cfg.to_dict())
    names = get_gguf_hf_weights_map(skeleton, processor)
    out = {}
    for t in reader.tensors:
        if t.name not in names:
            continue
        kind, data = t.tensor_type.name, np.asarray(t.data)
        if kind not in FORMATS:
            data = dequantize(data, t.tensor_type).astype(np.float32)
        data = processor.process(weights=data, name=t.name).weights
        out[names[t.name]] = (Blocks.from_gguf(kind, data, int(t.shape[0])) if kind in FORMATS
                              else torch.from_numpy(np.ascontiguousarray(data)))
    return out


def place_blocks(model, blocks: dict) -> None:
    """Give model's Linear and Embedding modules named in blocks (HF names without "model.": "layers.0.mlp.up_proj
    .weight") their Blocks, in cpu_kernels modules that hold no fp32 copy."""
    for name, b in blocks.items():
        parent_path, _, child = name.rpartition(".")[0].rpartition(".")
        parent = model.get_submodule(parent_path)
        old = getattr(parent, child)
        setattr(parent, child, Embedding(b) if isinstance(old, nn.Embedding) else Linear(b, old.bias))


def linears_on_numba(module: nn.Module, weight=lambda w: w) -> None:
    """Every nn.Linear in module whose rows are whole blocks of QK becomes a cpu_kernels.Linear over weight(its
    weight): the weight itself (fp32), or Blocks of it; the others stay torch's."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.in_features % QK == 0:
                setattr(parent, name, Linear(weight(child.weight), child.bias))


def use_numba(model) -> None:
    """Put a loaded model (fp32, CPU) on the numba kernels: every nn.Linear left whose rows are whole blocks of 32
    becomes a cpu_kernels.Linear over its own weight (linears_on_numba), and the head's arrays are packed once
    (model.runtime.head); blocks whose seven maps all run on the kernel take their decode steps as Fused."""
    linears_on_numba(model)
    for block in model.layers:
        block.fused = Fused.of(block)
    head = model.head
    model.runtime.kernels = "numba"
    model.runtime.head = pack(head) if isinstance(head, Blocks) or head.shape[1] % QK == 0 else None


class Fused:
    """A Block's forward on the numba kernels in two calls around the cache's (cache.step on the numpy arrays where
    the cache has one, cache.attend otherwise): cpu_kernels.attention_in (input norm, q, k, v) and attention_out
    (o, residual, post-attention norm, SwiGLU MLP, residual); the same maths as the block's modules, over their own
    weights (no copy). Steps of up to MAX_ROWS rows x tokens on the CPU, in
    inference; the modules take every other step (prefill chunks, training)."""

    def __init__(self, block):
        a, mlp = block.self_attn, block.mlp
        arrays = lambda m: (*m.packed, None if m.bias is None else m.bias.detach().numpy(), m.out_features)
        eps = lambda norm: np.float32(norm.eps)
        self.heads = a.n_heads, a.n_kv, a.head_dim
        self.before = (block.input_layernorm.weight.detach().numpy(), eps(block.input_layernorm),
                       arrays(a.q_proj), arrays(a.k_proj), arrays(a.v_proj))
        self.after = (arrays(a.o_proj), block.post_attention_layernorm.weight.detach().numpy(),
                      eps(block.post_attention_layernorm), arrays(mlp.gate_proj), arrays(mlp.up_proj),
                      arrays(mlp.down_proj))

    @classmethod
    def of(cls, block) -> "Fused | None":
        """Fused(block) if its maps are all cpu_kernels.Linear and no tensor-parallel reduction follows them."""
        a, mlp = block.self_attn, block.mlp
        maps = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if all(isinstance(m, Linear) for m in maps) and a.reduce is None and mlp.reduce is None:
            return cls(block)
        return None

    @staticmethod
    def takes(x: torch.Tensor) -> bool:
        """Whether a step's input x [B, T, D] runs here: CPU, fp32, at most MAX_ROWS rows, no autograd."""
        return (x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] * x.shape[1] <= MAX_ROWS
                and not (torch.is_grad_enabled() and x.requires_grad))

    def __call__(self, x: torch.Tensor, layer: int, cache) -> torch.Tensor:
        B, T, D = x.shape
        Hq, Hkv, hd = self.heads
        xn = np.ascontiguousarray(x.detach().numpy().reshape(B * T, D))
        q, k, v = attention_in(xn, *self.before)  # [B * T, H * hd]
        if cache.step is not None:  # the cache's numba step, on the arrays as they are
            out = cache.step(layer, q, k, v)  # [B, Hq, T, hd]
        else:
            out = cache.attend(layer, *(torch.from_numpy(t).view(B, T, H, hd).transpose(1, 2)
                                        for t, H in zip((q, k, v), (Hq, Hkv, Hkv)))).numpy()
        out = np.ascontiguousarray(out.transpose(0, 2, 1, 3).reshape(B * T, Hq * hd))
        return torch.from_numpy(attention_out(xn, out, *self.after)).view(B, T, D)
