"""Tensor parallelism, Megatron-style, over the ranks of a torch.distributed group (NCCL on GPU, gloo on CPU).

Each rank holds a slice of every layer:
  q/k/v_proj  output rows of whole GQA groups (kv heads kv0..kv1 and their G query heads each),
  o_proj      the matching input columns,            then an all-reduce sums the ranks' partial outputs;
  gate/up     output rows f0..f1 of the MLP,
  down_proj   the matching input columns,            then an all-reduce.
Heads and MLP rows are split as evenly as they go (SmolLM2's 3 kv heads over 2 ranks: 2 and 1), so a rank's
attention is exactly the single-process attention of its heads, and its caches hold only its kv heads.
Embedding, norms and head are replicated: after each all-reduce every rank holds the same hidden states, so every
rank computes the same logits and, with the same seed, makes the same draws and verification decisions; no
per-token broadcast is needed. agree() checks at the end that the ranks' tokens are rank 0's.
"""
import dataclasses
import os

import torch
import torch.distributed as dist

from .errors import UserError
from .models.loader import from_state_dict
from .runtime import Runtime


def split(n: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's share of n items, the first n % world ranks taking one more."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def init(tp: int, device: str) -> tuple[int, int]:
    """Join the process group that torchrun set up; returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp:
        raise UserError(f"--tp {tp} runs under torchrun with {tp} processes, e.g. "
                        f"`torchrun --nproc-per-node {tp} -m triforce_rt generate --tp {tp} ...` (found {world})")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), world


def shard(model, rank: int, world: int):
    """This rank's slice of model (a Transformer), with all-reduces after o_proj and down_proj."""
    cfg = model.config
    if cfg.num_key_value_heads < world:
        raise UserError(f"cannot split {cfg.num_key_value_heads} kv heads over {world} ranks")
    G, hd = cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
    kv0, kv1 = split(cfg.num_key_value_heads, world, rank)
    f0, f1 = split(cfg.intermediate_size, world, rank)
    local = dataclasses.replace(cfg, num_attention_heads=(kv1 - kv0) * G, num_key_value_heads=kv1 - kv0,
                                intermediate_size=f1 - f0)
    q, kv = slice(kv0 * G * hd, kv1 * G * hd), slice(kv0 * hd, kv1 * hd)
    rows = {"q_proj": q, "k_proj": kv, "v_proj": kv, "gate_proj": slice(f0, f1), "up_proj": slice(f0, f1)}
    cols = {"o_proj": q, "down_proj": slice(f0, f1)}
    sd = {}
    for name, t in model.state_dict().items():
        module, kind = name.split(".")[-2:] if "." in name else ("", name)
        if module in rows:
            t = t[rows[module]]
        elif module in cols and kind == "weight":
            t = t[:, cols[module]]
        elif module in cols and rank:  # a row-parallel bias is added once, by rank 0
            t = torch.zeros_like(t)
        sd[name] = t.clone()
    out = from_state_dict(local, sd).eval()
    out.setup_rope(model.rope.max_len if model.rope else None)
    out.runtime = Runtime(model.tokenizer, model.source, tensor_parallel=True)
    for layer in out.layers:
        layer.self_attn.reduce = layer.mlp.reduce = dist.all_reduce
    return out


def agree(tokens: list) -> None:
    """Raise if this rank's tokens differ from rank 0's (the ranks must have made the same decisions)."""
    mine = [list(tokens)]
    dist.broadcast_object_list(mine, src=0)
    if mine[0] != list(tokens):
        raise RuntimeError(f"tensor-parallel rank {dist.get_rank()} diverged from rank 0")


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
