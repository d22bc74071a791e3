"""Prompt encoding, streamed text output and the one-line run summary, shared by the commands."""
import sys

from tqdm import tqdm


class LogBar(tqdm):
    """The progress bar of a long job: tqdm's 0.1 s between draws on a terminal, a minute into a log file, so that a
    job run in the background shows where it is without flooding its log. set_postfix never forces a draw (tqdm's
    does by default, which would redraw every step): the new postfix shows at update()'s next draw."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, mininterval=0.1 if sys.stderr.isatty() else 60.0, **kwargs)

    def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):
        super().set_postfix(ordered_dict, refresh, **kwargs)


def read_text(path: str) -> str:
    """A text file's contents as UTF-8 (a byte-order mark dropped); a binary or otherwise encoded file is a one-line
    error rather than text full of replacement characters."""
    from .errors import UserError

    with open(path, "rb") as f:
        data = f.read()
    if b"\0" in data[:8192]:
        raise UserError(f"{path} looks like a binary file, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from None


def chat_ids(tokenizer, messages: list) -> list:
    """Token ids of messages [{role, content}...] in the model's chat template, ready for the assistant's turn."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def encode(tokenizer, text: str, chat: bool) -> list:
    if chat:
        return chat_ids(tokenizer, [{"role": "user", "content": text}])
    return tokenizer(text).input_ids


class TextStream:
    """Prints decoded text as tokens arrive, holding back an incomplete UTF-8 sequence."""

    def __init__(self, tokenizer, out=None):
        self.tok, self.ids, self.shown, self.out = tokenizer, [], 0, out or sys.stdout

    def __call__(self, token_id: int):
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.shown:])
            self.out.flush()
            self.shown = len(text)


def summary_line(res) -> str:
    """One line: prefill, decode speed and, for speculative modes, each drafting tier's acceptance."""
    line = (f"[{res.mode}] prompt {res.prompt_tokens} tok, prefill {res.prefill_seconds:.2f} s | "
            f"{res.new_tokens} new tok, decode {res.decode_tokens_per_second:.1f} tok/s")
    if len(res.tiers) > 1:
        rates = ", ".join(f"{t['name']} {t['accepted']}/{t['drafted']}"
                          + (f" (α {alpha(t):.2f})" if alpha(t) is not None else "") for t in res.tiers[:-1])
        line += f" | accepted {rates}; {res.tokens_per_target_call:.2f} tok/target call"
    if len(res.plan) > 1 or res.plan and res.plan[0]["mode"] != res.mode:  # --mode auto: its plan and switches
        line += " | plan " + " → ".join(f"{e['mode']}" + (f" γ{e['gamma2']}" if e.get("gamma2") else "")
                                        + f" at {e['at']}" for e in res.plan)
    return line


def tier_stats(tier: dict) -> dict:
    """A tier's stats (TierStats as a dict) as every report shows them: acceptance = accepted / drafted, α, calls
    and milliseconds per call."""
    a = alpha(tier)
    return {"name": tier["name"], "acceptance": round(tier["accepted"] / tier["drafted"], 3) if tier["drafted"] else None,
            "alpha": None if a is None else round(a, 3), "calls": tier["calls"],
            "ms_per_call": round(1000 * tier["seconds"] / max(1, tier["calls"]), 1)}


def alpha(tier: dict) -> float | None:
    """Per-token acceptance rate of a tier's stats dict (TierStats as a dict): accepted / examined drafts, examined =
    accepted + rejected (the α of speculative decoding; accepted / drafted is lower, since the drafts after a
    rejection count as drafted but are never examined)."""
    seen = tier["accepted"] + tier.get("rejected", 0)
    return tier["accepted"] / seen if seen else None
