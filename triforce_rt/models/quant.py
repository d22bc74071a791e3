"""The quantized copy of a model that its self-drafting tiers run on (--draft-quant q8|q4, QuantSpec's idea).

Every matrix whose rows are whole blocks of 32 (the linear maps, the embedding table, the head) is quantized by
gguf's reference quantizer to Q8_0 (q8) or Q4_0 (q4), from the target's fp32 values, or from the values of its own
blocks for a GGUF read in blocks; the norms are copied in fp32. The copy runs on the numba kernels (CPU, fp32) and
shares no tensor with the target, so a target whose layers stream from host memory (--offload weights) keeps its
drafting copy resident. The target still verifies with its own weights: the tokens do not change, only how many
drafts are accepted.
"""
from cpu_kernels import QK, Blocks

from ..errors import UserError
from ..runtime import Runtime

BLOCK_FORMAT = {"q8": "Q8_0", "q4": "Q4_0"}  # --draft-quant -> block format (settings.QUANTS)


def quantized(model, quant: str):
    """model's drafting copy in the format of quant ('q8' | 'q4'), made once and kept (model.runtime.casts)."""
    fmt = BLOCK_FORMAT[quant]
    rt = model.runtime
    if fmt in rt.casts:
        return rt.casts[fmt]
    if model.device.type != "cpu":
        raise UserError("--draft-quant runs the drafting copy on the CPU kernels (numba); with --device cuda use "
                        "--draft-dtype instead")
    from .kernels import use_numba
    from .loader import from_state_dict

    host = rt.weight_stream.host_parameters() if rt.weight_stream is not None else {}
    sd = {name: host.get(p, p).detach().float().clone() for name, p in model.named_parameters()}
    sd.update({name: b.clone() for name, b in model.named_buffers() if b is not None})  # vocab_ids
    sd.update({f"{name}.weight": m.blocks.dequantize() for name, m in model.named_modules()
               if getattr(m, "blocks", None) is not None})
    for name, w in sd.items():  # [N, K] matrices of whole blocks
        if w.dim() == 2 and w.shape[1] % QK == 0:
            sd[name] = Blocks.quantize(w, fmt)
    copy = from_state_dict(model.config, sd).eval().setup_rope(model.rope.max_len if model.rope else None)
    if copy.weight_bytes() >= model.weight_bytes():
        have = "/".join(sorted({b.fmt for b in model.weight_blocks})) or str(model.norm.weight.dtype)[6:]
        raise UserError(f"--draft-quant {quant}: a {fmt} copy ({copy.weight_bytes() / 1e6:.0f} MB) would not be "
                        f"smaller than the target's {have} weights ({model.weight_bytes() / 1e6:.0f} MB); use a "
                        "smaller --draft-quant, or none")
    copy.runtime = Runtime(rt.tokenizer, rt.source)
    use_numba(copy)
    rt.casts[fmt] = copy
    return copy
