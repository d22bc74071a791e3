"""RoPE rotation and the one attention call every cache goes through.

Shapes: q [B, Hq, T, D]; k, v [B, Hkv, S, D]; Hq = G * Hkv (GQA, query head h uses kv head h // G).
This is the single switch point for the attention kernel: SDPA here, FlashAttention on CUDA (GPU issue).
"""
import torch
import torch.nn.functional as F


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, half-split layout. x [B, H, T, D]; cos, sin [B, T, D]."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ / √D + mask) v without expanding k, v to Hq heads.

    The G query heads of a kv head are folded into the query axis: q -> [B, Hkv, G*T, D].
    mask: bool [B|1, Hkv|1, T, S], True = visible; None = every key visible to every query.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G * T, D)
    if mask is not None:
        mask = mask.unsqueeze(2).expand(mask.shape[0], mask.shape[1], G, T, S).reshape(mask.shape[0], mask.shape[1], G * T, S)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
    return out.view(B, Hq, T, D)


def causal_mask(T: int, S: int, device=None) -> torch.Tensor:
    """bool [1, 1, T, S]: the T new queries sit at key slots S-T .. S-1; query t sees keys 0 .. S-T+t."""
    q_slot = torch.arange(S - T, S, device=device)[:, None]
    return (torch.arange(S, device=device)[None, :] <= q_slot)[None, None]
