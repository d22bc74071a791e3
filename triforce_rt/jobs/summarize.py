"""`triforce summarize`: each file becomes a chat request for a summary, decoded with the hierarchy and streamed.

A document that does not fit the context (prompt + max_new_tokens) is refused with both token counts, or fitted:
  truncate    keep its first and last halves of what fits, joined by a "[...]" line;
  map-reduce  summarize consecutive parts that fit, then summarize those summaries (again if they do not fit).
"""
import os
import sys

from ..engine import generate
from ..errors import UserError
from ..textio import TextStream, encode, read_text, summary_line

INSTRUCTION = "Summarize the following document."
PART_INSTRUCTION = "Summarize this part of a longer document."
REDUCE_INSTRUCTION = "These are summaries of consecutive parts of one document. Write one summary of the whole document."
GAP = "\n\n[...]\n\n"


def request(tokenizer, instruction: str, text: str) -> list:
    return encode(tokenizer, f"{instruction}\n\n{text}", chat=True)


def room(model, instruction: str, max_new_tokens: int) -> int:
    """Document tokens that fit with the chat template, the instruction and the new tokens."""
    overhead = len(request(model.tokenizer, instruction, "")) + 8  # + slack: re-tokenizing at the seam can merge
    return model.config.context_limit - max_new_tokens - overhead


def truncate(tokenizer, doc: list, n: int) -> tuple:
    """(text, tokens kept): the start and the end of doc, n tokens with the gap line between them."""
    gap = len(tokenizer(GAP, add_special_tokens=False).input_ids)
    head = (n - gap) // 2
    return tokenizer.decode(doc[:head]) + GAP + tokenizer.decode(doc[len(doc) - (n - gap - head):]), n - gap


def summarize_text(model, drafter, text: str, cfg, fit: str, name: str, out, progress: bool):
    """Stream one summary of text to out; returns the last GenerationResult."""
    tok = model.tokenizer
    doc = tok(text, add_special_tokens=False).input_ids
    n = room(model, INSTRUCTION, cfg.max_new_tokens)
    if len(doc) > n:
        if fit == "refuse":
            raise UserError(f"{name} is {len(doc)} tokens, but {n} fit in the model's context of "
                            f"{model.config.context_limit} with the prompt and {cfg.max_new_tokens} new tokens; "
                            "use --fit truncate or --fit map-reduce (or fewer --max-new-tokens)")
        if n < 64:
            raise UserError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for the document in the context")
        if fit == "truncate":
            text, kept = truncate(tok, doc, n)
            print(f"[{name}: --fit truncate kept {kept} of its {len(doc)} tokens (its start and end) and dropped "
                  f"{len(doc) - kept} from the middle]", file=sys.stderr)
        else:
            return map_reduce(model, drafter, doc, cfg, name, out, progress)
    return run(model, drafter, request(tok, INSTRUCTION, text), cfg, out, progress)


def map_reduce(model, drafter, doc: list, cfg, name: str, out, progress: bool):
    tok = model.tokenizer
    n = room(model, PART_INSTRUCTION, cfg.max_new_tokens)
    parts = [doc[s : s + n] for s in range(0, len(doc), n)]
    summaries = []
    for i, part in enumerate(parts):
        print(f"[{name}: part {i + 1}/{len(parts)}]", file=sys.stderr)
        res = run(model, drafter, request(tok, PART_INSTRUCTION, tok.decode(part)), cfg, None, progress)
        summaries.append(f"Part {i + 1}: {res.text.strip()}")
    joined = "\n\n".join(summaries)
    if len(tok(joined, add_special_tokens=False).input_ids) > room(model, REDUCE_INSTRUCTION, cfg.max_new_tokens):
        return map_reduce(model, drafter, tok(joined, add_special_tokens=False).input_ids, cfg, name, out, progress)
    return run(model, drafter, request(tok, REDUCE_INSTRUCTION, joined), cfg, out, progress)


def run(model, drafter, ids: list, cfg, out, progress: bool):
    """Generate with progress bars on stderr (prefill tokens; decode tok/s unless the text streams to a terminal,
    where it shows its own progress)."""
    from tqdm import tqdm

    stream = TextStream(model.tokenizer, out) if out is not None else None
    bar = tqdm(total=cfg.max_new_tokens, desc="decode", unit="tok", leave=False, file=sys.stderr,
               disable=not progress or (out is sys.stdout and sys.stdout.isatty()))

    def on_token(t):
        bar.update(1)
        if stream:
            stream(t)

    res = generate(model, ids, cfg, on_token=on_token, progress=progress, drafter=drafter)
    bar.close()
    if out is sys.stdout:  # the text went to the terminal too: the stats start a line of their own
        print(file=sys.stderr)
    print(summary_line(res), file=sys.stderr)
    return res


def summarize_files(model, drafter, files: list, cfg, fit: str, out_path: str | None, progress: bool) -> None:
    out = open(out_path, "w", encoding="utf-8") if out_path else sys.stdout
    try:
        for i, path in enumerate(files):
            text = read_text(path)
            if not text.strip():
                raise UserError(f"{path} is empty")
            if len(files) > 1:
                out.write(("\n" if i else "") + f"## {os.path.basename(path)}\n\n")
            summarize_text(model, drafter, text, cfg, fit, os.path.basename(path), out, progress)
            out.write("\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
