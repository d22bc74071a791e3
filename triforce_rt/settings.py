"""Every generation setting and every mode, declared once.

A GenerationConfig field carries its type, bounds and help (setting()); the CLI flags (cli.py), the experiment sweep
keys (experiment/schema.py), the per-line keys of `batch` (jobs/batch.py) and the report's column order derive from
these fields, and check_config() is the one validation all of them pass through. MODES maps each mode to its
drafting tiers, bottom first; the target verifies last. TIER_SETTINGS lists what each tier kind reads.
"""
import math
import reprlib
from dataclasses import dataclass, field, fields

from .errors import UserError
from .sampling import SamplingParams

TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def setting(default, kind, help: str, lo=None, hi=None, lo_open=False, choices=None, spec=False, sweep=False,
            line=False):
    """A field's declaration. kind: int, float, bool or str; lo, hi: bounds, inclusive (lo_open: lo excluded);
    choices: the allowed strings; spec: a speculation setting (its own CLI group); sweep: an experiment may sweep it;
    line: a `batch` input line may set it."""
    meta = dict(kind=kind, help=help, lo=lo, hi=hi, lo_open=lo_open, choices=choices, spec=spec, sweep=sweep,
                line=line)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Mode:
    tiers: tuple  # drafting tier kinds, bottom first: each drafts for the next, the last one for the target
    help: str
    auto: bool = False  # the tiers are a pool: the plan (which of them draft, and γ) is chosen while decoding


MODES = {
    "ar": Mode((), "target"),
    "triforce": Mode(("drafter", "retrieval"), "tiny drafter + StreamingLLM cache → target + retrieval cache → target"),
    "self-spec": Mode(("retrieval",), "target + retrieval cache → target"),
    "streaming-spec": Mode(("streaming",), "target + StreamingLLM cache → target (MagicDec's self-speculation)"),
    "draft": Mode(("drafter",), "tiny drafter + StreamingLLM cache → target (classic speculative decoding)"),
    "ngram": Mode(("ngram",), "n-gram lookup in the context → target (prompt-lookup decoding)"),
    "triforce-ngram": Mode(("drafter", "ngram", "retrieval"), "n-gram lookup, or the tiny drafter where the lookup "
                           "finds no match → target + retrieval cache → target"),
    "self-spec-ngram": Mode(("retrieval", "ngram"), "n-gram lookup, or the target + retrieval cache where the lookup "
                            "finds no match → target"),
    "redrafter": Mode(("head",), "recurrent draft head on the target's hidden state → target (ReDrafter; with "
                      "--beams W, W beams verified as one tree)"),
    "triforce-redrafter": Mode(("head", "retrieval"), "recurrent draft head on tier 2's hidden state → target + "
                               "retrieval cache → target"),
    "redrafter-ngram": Mode(("head", "ngram"), "n-gram lookup, or the recurrent draft head where the lookup finds no "
                            "match → target"),
    "auto": Mode(("retrieval", "ngram"), "chooses among ar, ngram, self-spec and self-spec-ngram, and gamma2, from "
                 "step costs measured on this machine and the acceptance it observes; switches between rounds",
                 auto=True),
}
TIER_SETTINGS = {"drafter": ("sinks", "window", "draft_dtype"), "ngram": ("ngram",), "head": ("beams", "head_cutoff"),
                 "retrieval": ("budget", "chunk_size", "refresh", "draft_dtype", "draft_quant"),
                 "streaming": ("budget", "chunk_size", "sinks", "window", "draft_dtype", "draft_quant")}
SELF_DRAFTING = ("retrieval", "streaming")  # tiers that run the target's own weights (draft_dtype, draft_quant)
DRAFTER_MODES = tuple(m for m, spec in MODES.items() if "drafter" in spec.tiers)  # modes of the tiny drafter
HEAD_MODES = tuple(m for m, spec in MODES.items() if "head" in spec.tiers)  # modes of a recurrent draft head
DTYPES = ("float32", "bfloat16", "float16")
QUANTS = ("none", "q8", "q4")


def gamma_name(tiers: tuple, i: int) -> str:
    """The γ of drafting tier i: gamma2 for the tier the target verifies, gamma1 for every tier below it."""
    return "gamma2" if i == len(tiers) - 1 else "gamma1"


def relevant(mode: str) -> set:
    """The settings that change what a mode computes (sampling aside)."""
    tiers = MODES[mode].tiers
    return {k for t in tiers for k in TIER_SETTINGS[t]} | {gamma_name(tiers, i) for i in range(len(tiers))}


def self_drafting_modes() -> list:
    return [m for m, spec in MODES.items() if set(SELF_DRAFTING) & set(spec.tiers)]


def uses_retrieval(mode: str) -> bool:
    return "retrieval" in MODES[mode].tiers


@dataclass
class GenerationConfig:
    max_new_tokens: int = setting(128, int, "new tokens at most", lo=1, line=True)
    ignore_eos: bool = setting(False, bool, "keep generating past the end-of-sequence token", line=True)
    mode: str = setting("ar", str, "; ".join(f"{m}: {s.help}" for m, s in MODES.items()), choices=tuple(MODES))
    seed: int = setting(0, int, "sampling seed", lo=0, hi=2**64 - 1, line=True)
    prefill_chunk: int = setting(1024, int, "prompt tokens per prefill forward (bounds the score matrix to chunk x "
                                 "context)", lo=1)
    budget: int | None = setting(None, int, "retrieval cache tokens, chunk 0 included (default: 4096, at most 1/8 of "
                                 "the prompt; an explicit value is capped at the prompt)", lo=1, spec=True, sweep=True)
    chunk_size: int = setting(8, int, "retrieval chunk size", lo=1, spec=True, sweep=True)
    gamma1: int = setting(4, int, "drafts per verification by the tiers below the one the target verifies: the "
                          "drafter, head or n-gram lookup for tier 2 (triforce modes); the retrieval tier or head where "
                          "the n-gram lookup finds no match (self-spec-ngram, redrafter-ngram)", lo=1, spec=True,
                          sweep=True)
    gamma2: int = setting(6, int, "tokens per target verification", lo=1, spec=True, sweep=True)
    window: int | None = setting(None, int, "StreamingLLM window (default: the drafter's trained context - sinks; "
                                 "budget - sinks for streaming-spec)", lo=1, spec=True, sweep=True)
    sinks: int = setting(16, int, "StreamingLLM attention sinks", lo=0, spec=True, sweep=True)
    refresh: int = setting(1, int, "re-select the retrieval cache after each round that ends N or more new tokens "
                           "after the last selection (default 1: every round; 0 = never, as TriForce)", lo=0,
                           spec=True, sweep=True)
    ngram: int = setting(3, int, "longest n-gram the lookup tier matches (down to 2)", lo=2, spec=True, sweep=True)
    beams: int = setting(1, int, "redrafter: beams the recurrent head drafts (each of gamma2 tokens); more than 1 "
                         "verifies them as one deduplicated tree in one target forward", lo=1, hi=64, spec=True,
                         sweep=True)
    head_cutoff: float = setting(0.2, float, "redrafter modes: the head drafts a next token while its probability of "
                                 "the draft so far times that of its likeliest next token is at least this, up to "
                                 "gamma tokens (a tree keeps the nodes whose path is as likely); 0 = always gamma",
                                 lo=0.0, hi=1.0, spec=True, sweep=True)
    draft_dtype: str | None = setting(None, str, "dtype of the drafting tiers (default: the target's); "
                                      "verification keeps the output exact", choices=DTYPES, spec=True, sweep=True)
    draft_quant: str = setting("none", str, "weights of the self-drafting tiers: the target's (none), or a copy in "
                               "8-bit (q8: Q8_0) or 4-bit (q4: Q4_0) blocks on the CPU kernels; verification keeps "
                               "the output exact", choices=QUANTS, spec=True, sweep=True)
    temperature: float = setting(0.0, float, "0 = greedy", lo=0.0, sweep=True, line=True)
    top_p: float = setting(1.0, float, "nucleus sampling: keep the smallest set of tokens with this much "
                           "probability, in (0, 1]", lo=0.0, hi=1.0, lo_open=True, sweep=True, line=True)
    top_k: int = setting(0, int, "keep the k most likely tokens (0 = all)", lo=0, sweep=True, line=True)

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k)


SETTINGS = {f.name: f.metadata for f in fields(GenerationConfig)}


def check_setting(name: str, value):
    """value, checked against its field's declaration (and an int widened to float for a float field); a UserError
    naming the setting otherwise. None is the default of budget, window and draft_dtype."""
    m = SETTINGS[name]
    if value is None and GenerationConfig.__dataclass_fields__[name].default is None:
        return None
    kind = m["kind"]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool)) or (
        kind is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise UserError(f"{name} must be {TYPE_NAMES[kind]} (got {reprlib.repr(value)})")
    if m["choices"] and value not in m["choices"]:
        raise UserError(f"unknown {name} '{value}' (available: {', '.join(m['choices'])})")
    if kind is float:
        value = float(value)
        low = value <= m["lo"] if m["lo_open"] else value < m["lo"]
        if not math.isfinite(value) or low or (m["hi"] is not None and value > m["hi"]):
            bounds = (f"in {'(' if m['lo_open'] else '['}{m['lo']:g}, {m['hi']:g}]" if m["hi"] is not None
                      else f">= {m['lo']:g}")
            raise UserError(f"{name} must be a finite number {bounds} (got {value})")
    elif kind is int:
        if value < m["lo"]:
            raise UserError(f"{name} must be at least {m['lo']} (got {value})")
        if m["hi"] is not None and value > m["hi"]:
            raise UserError(f"{name} must be at most {m['hi']} (got {value})")
    return value


def check_config(cfg: GenerationConfig) -> None:
    """Every setting against its declaration, then the rules between settings, as one-line errors."""
    for name in SETTINGS:
        check_setting(name, getattr(cfg, name))
    if cfg.budget is not None and cfg.budget < cfg.chunk_size:
        raise UserError(f"budget ({cfg.budget} tokens) must hold at least one chunk of chunk_size={cfg.chunk_size}")
    if cfg.beams > 1 and cfg.mode != "redrafter":
        raise UserError(f"beams {cfg.beams}: only mode 'redrafter' verifies a tree of beams (got mode '{cfg.mode}')")
    if cfg.draft_quant != "none":
        if not set(SELF_DRAFTING) & set(MODES[cfg.mode].tiers):
            raise UserError(f"draft_quant {cfg.draft_quant}: mode '{cfg.mode}' has no tier that drafts with the "
                            f"target's weights (those that do: {', '.join(self_drafting_modes())})")
        if cfg.draft_dtype:
            raise UserError("draft_quant and draft_dtype exclude each other: a quantized drafting copy computes in "
                            "float32")
