"""RoPE rotation and the one attention call every cache goes through.

Shapes: q [B, Hq, T, D]; k, v [B, Hkv, S, D]; Hq = G * Hkv (GQA, query head h uses kv head h // G).
This is the single switch point for the attention kernel (use_kernel): torch SDPA, which on CUDA dispatches to its
own flash and memory-efficient kernels; flash-attn's flash_attn_with_kvcache where it is installed; or the numba
CPU kernel (cpu_attention.py). Both special kernels take steps whose queries each see a prefix of their row's slots
(limits): flash-attn one-token steps in fp16/bf16 on CUDA (its split-KV decoding case), numba steps of up to
cpu_attention.MAX_T tokens in fp32 on the CPU, reading the cache in place (a PagedCache's blocks too: attend_paged);
for those, a cache's whole step (RoPE, cache writes, attention) is one numba call per layer (view_step,
paged_step: a cpu_attention.Step made at begin()).
Every other step (masks that are not a prefix, prefill chunks, trees) stays on SDPA.
"""
import importlib.util

import torch
import torch.nn.functional as F

from . import cpu_attention

KERNELS = ("auto", "sdpa", "flash", "numba")
FOLD_T = 16  # steps of at most this many queries fold GQA (attend)


def flash_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def use_kernel(name: str) -> str:
    """Choose the kernel for every later attend(): 'sdpa', 'flash', 'numba', or 'auto' (flash where
    flash_available(), numba otherwise: it serves CPU steps only, so CUDA steps then stay on SDPA).
    Returns the kernel chosen."""
    global _kernel
    if name not in KERNELS:
        raise ValueError(f"unknown attention kernel '{name}' (choose from {', '.join(KERNELS)})")
    if name == "auto":
        name = "flash" if flash_available() else "numba"
    if name == "flash" and not flash_available():
        raise ValueError("the flash kernel needs CUDA and the flash-attn package (pip install flash-attn); "
                         "use --attn sdpa")
    _kernel = name
    return name


_kernel = use_kernel("auto")


def kernel() -> str:
    """The kernel chosen by the latest use_kernel()."""
    return _kernel


def _takes(t: torch.Tensor, T: int, limits: torch.Tensor | None) -> bool:
    """The numba kernel's conditions for a step of T queries whose tensors are like t: prefix visibility (limits),
    CPU, fp32, at most MAX_T queries, a head size that is a multiple of 4."""
    return (_kernel == "numba" and limits is not None and t.device.type == "cpu" and t.dtype == torch.float32
            and T <= cpu_attention.MAX_T and t.shape[-1] % 4 == 0)


def in_place(q: torch.Tensor, k: torch.Tensor, limits: torch.Tensor | None) -> bool:
    """Whether the numba kernel can take this step (q [B, Hq, T, D] over k): _takes, and no autograd."""
    return (_takes(q, q.shape[2], limits) and k.dtype == q.dtype
            and not (torch.is_grad_enabled() and q.requires_grad))


def one_call(K: torch.Tensor, slots: torch.Tensor, cos: torch.Tensor, limits: torch.Tensor | None) -> bool:
    """Whether a cache whose keys are K takes this forward's steps (new tokens at slots [B, T], RoPE's cos) in one
    numba call per layer (cpu_attention.Step): _takes, fp32 cos, outside autograd (decided at begin(), before any
    query exists)."""
    return _takes(K, slots.shape[1], limits) and cos.dtype == torch.float32 and not torch.is_grad_enabled()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, half-split layout. x [B, H, T, D]; cos, sin [B, T, D]. On the CPU in fp32 without autograd, numba's
    loop gives the same bits in one call (cpu_attention.rotate)."""
    if (x.device.type == "cpu" and x.dtype == cos.dtype == torch.float32
            and not (torch.is_grad_enabled() and x.requires_grad)):
        return cpu_attention.rotate(x, cos, sin)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           limits: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ / √D + mask) v, GQA without copying k, v to Hq heads.

    mask: bool [B|1, Hkv|1, T, S], True = visible; None = every key visible to every query.
    limits: int [B, T], given by a step whose query t of row b sees exactly the slots s < limits[b, t]: the same
    visibility as mask, in the form the numba kernel and (for T = 1) flash_attn_with_kvcache take, reading k, v in
    place ([B, S, H, D] views for flash-attn).
    On SDPA: unmasked, or a short step (T <= FOLD_T: decode, verify and drafting steps): the G query heads of a kv
    head are folded into the query axis, q -> [B, Hkv, G*T, D], so each key and value is read once for all G*T queries.
    Longer masked steps (prefill chunks): SDPA's own GQA, 1.7x faster than folding for a masked 1024-token chunk
    (2 CPU threads, SmolLM2 shapes). benchmarks/results/kernels-cpu.md times this call for T = 1..16 at 8K.
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if (_kernel == "flash" and limits is not None and T == 1 and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16)):
        from flash_attn import flash_attn_with_kvcache

        out = flash_attn_with_kvcache(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                      cache_seqlens=limits[:, 0].to(torch.int32))  # [B, T, Hq, D]
        return out.transpose(1, 2)
    if in_place(q, k, limits):
        out = cpu_attention.attend_view(q, k, v, limits)
        if out is not None:
            return out
    if mask is None or T <= FOLD_T:  # query rows (g, t) of kv head h: mask row t for every g
        G = Hq // Hkv
        mask = None if mask is None else mask.repeat(1, 1, G, 1)
        return F.scaled_dot_product_attention(q.reshape(B, Hkv, G * T, D), k, v, attn_mask=mask).view(B, Hq, T, D)
    if mask.shape[1] > 1:
        mask = mask.repeat_interleave(Hq // Hkv, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def attend_paged(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, table: torch.Tensor, end: int,
                 mask: torch.Tensor | None, limits: torch.Tensor) -> torch.Tensor:
    """attend() over a paged pool's layer K, V [n_blocks, bs, Hkv, D] through table [B, blocks] (row b's slot s:
    block table[b, s // bs], offset s % bs), slots 0 .. end - 1. The numba kernel reads the blocks in place; other
    kernels get each row's blocks gathered, as the strided view [B, Hkv, end, D] (copying it to contiguous costs
    more than SDPA gains)."""
    if in_place(q, K, limits):
        return cpu_attention.attend_blocks(q, K, V, table, limits)
    B, nb = table.shape
    bs, Hkv, D = K.shape[1:]
    k, v = (t[table].view(B, nb * bs, Hkv, D)[:, :end].transpose(1, 2) for t in (K, V))
    return attend(q, k, v, mask, limits)


def view_step(cos, sin, slots, limits, K, V, last_q=None) -> "cpu_attention.Step | None":
    """A contiguous cache's steps of this forward in one numba call per layer where one_call allows: K, V [layers,
    B, Hkv, S, D], the new tokens' slots and limits [B, T], last_q [layers, B, Hq, D] or None. The same values as
    rotate, the cache writes and attend in turn. None otherwise: the cache does those."""
    if one_call(K, slots, cos, limits) and K.is_contiguous() and V.is_contiguous():
        return cpu_attention.Step.view(cos, sin, slots, limits, K, V, last_q)
    return None


def paged_step(cos, sin, slots, limits, K, V, table, last_q=None) -> "cpu_attention.Step | None":
    """view_step for a paged pool K, V [layers, n_blocks, bs, Hkv, D] through table [B, blocks] (attend_paged)."""
    if one_call(K, slots, cos, limits):
        return cpu_attention.Step.blocks(cos, sin, slots, limits, K, V, table, last_q)
    return None


def causal_mask(T: int, S: int, device=None) -> torch.Tensor:
    """bool [1, 1, T, S]: the T new queries sit at key slots S-T .. S-1; query t sees keys 0 .. S-T+t."""
    q_slot = torch.arange(S - T, S, device=device)[:, None]
    return (torch.arange(S, device=device)[None, :] <= q_slot)[None, None]
