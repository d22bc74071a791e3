"""Rotary position embedding frequencies, with the scalings transformers supports for Llama-family models.

inv_freq[j] = 1 / θ^(2j/D) for j < D/2, then rescaled per rope_type; cos/sin = cos/sin(pos · inv_freq) · attention_factor.
"""
import math

import torch

from cuda_graphs import capturing


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def inv_freq_and_factor(cfg, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """[D/2] inverse frequencies and the cos/sin multiplier for cfg.rope_scaling at the given sequence length."""
    s, dim, theta = cfg.rope_scaling, cfg.head_dim, cfg.rope_theta
    kind = s.get("rope_type", "default")
    if kind == "default":
        return _base_inv_freq(theta, dim), 1.0
    if kind == "linear":
        return _base_inv_freq(theta, dim) / s["factor"], 1.0
    if kind == "dynamic":  # NTK-aware: θ grows once the sequence passes the trained length
        L0, f = cfg.max_position_embeddings, s["factor"]
        L = max(seq_len or L0, L0)
        theta = theta * ((f * L / L0) - (f - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(theta, dim), 1.0
    if kind == "llama3":
        inv = _base_inv_freq(theta, dim)
        f, lo, hi, L0 = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > L0 / lo, inv / f, inv)
        smooth = (L0 / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / f + smooth * scaled
        medium = (wavelen >= L0 / hi) & (wavelen <= L0 / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(cfg, s, dim, theta)
    raise ValueError(f"unsupported rope_type '{kind}' (supported: default, linear, dynamic, llama3, yarn)")


def _yarn(cfg, s, dim, theta):
    L0 = s["original_max_position_embeddings"]
    f = s.get("factor") or cfg.max_position_embeddings / L0

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = s.get("attention_factor")
    if factor is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        factor = mscale(f, m) / mscale(f, m_all) if m and m_all else mscale(f)
    fast, slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):  # the dimension whose wavelength fits `rotations` times in L0
        return dim * math.log(L0 / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = correction_dim(fast), correction_dim(slow)
    if s.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate by f
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    inv = (1.0 / (f * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv, float(factor)


class Rope:
    """cos_sin(positions [B, T]) -> cos, sin [B, T, D] in fp32. Tables are precomputed except for dynamic NTK,
    whose frequencies depend on the largest position of the step (as in transformers)."""

    def __init__(self, cfg, device=None, max_len: int | None = None):
        self.cfg, self.device = cfg, device
        self.dynamic = cfg.rope_scaling.get("rope_type") == "dynamic"
        self.max_len = max_len or cfg.max_position_embeddings
        if not self.dynamic:
            inv, factor = inv_freq_and_factor(cfg)
            self.cos_table, self.sin_table = self._table(torch.arange(self.max_len, device=device), inv, factor)

    def _table(self, positions, inv, factor):
        freqs = positions[..., None].float() * inv.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * factor, emb.sin() * factor

    def cos_sin(self, positions: torch.Tensor):
        if positions.numel() == 0:
            empty = torch.zeros(*positions.shape, self.cfg.head_dim, device=positions.device)
            return empty, empty
        if self.dynamic:
            inv, factor = inv_freq_and_factor(self.cfg, int(positions.max()) + 1)
            return self._table(positions, inv, factor)
        if not capturing(positions.device) and int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} beyond the RoPE table ({self.max_len})")
        return self.cos_table[positions], self.sin_table[positions]
