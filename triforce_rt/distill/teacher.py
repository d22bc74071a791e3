"""The teacher pass: the target's next-token distributions over the corpus, computed once and cached on disk.

A record is one student sequence of L tokens laid out as the drafter's StreamingCache sees it at decode time:
the first S tokens (sinks) then the last L - S. Its labels are the teacher's top-K log-probabilities after each
token, computed with the teacher's whole context. Two kinds of records:
  text    a slice of a document, read as is;
  answer  a chat prompt over a document slice, then the teacher's own continuation (greedy, or T = 0.8 for every
          other batch): the text a drafter really has to predict while decoding (on-policy, as in DistillSpec).
"""
import random
import time

import torch

from retrieval_cache import FullCache, NoCache

from ..engine import capacity, prefill
from ..sampling import SamplingParams, sample
from ..settings import GenerationConfig
from ..textio import LogBar
from .corpus import Documents

INSTRUCTIONS = {
    True: ["Explain what the following Python code does.", "Summarize what this code does, function by function.",
           "Describe the purpose of this Python module and its main functions."],
    False: ["Summarize the following text.", "What are the main points of this document?",
            "Explain the following text in simple words."],
}
MARK = "\x00DOC\x00"


def top_k(logits: torch.Tensor, k: int) -> tuple:
    """logits [..., V] -> top-k log-probabilities (fp16) and their token ids (int32), each [..., k]."""
    lp, ids = logits.float().log_softmax(-1).topk(k, dim=-1)
    return lp.half(), ids.int()


def chat_parts(tokenizer, instruction: str) -> tuple:
    """Token ids before and after the document in a chat prompt."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"{instruction}\n\n{MARK}"}],
                                         add_generation_prompt=True, tokenize=False)
    before, after = text.split(MARK)
    return (tokenizer.encode(before, add_special_tokens=False), tokenizer.encode(after, add_special_tokens=False))


def layout(n: int, L: int, S: int) -> torch.Tensor:
    """Indices of the L tokens a student record keeps from a sequence of n (all of them when n <= L)."""
    if n <= L:
        return torch.arange(n)
    return torch.cat([torch.arange(S), torch.arange(n - (L - S), n)])


def text_batch(model, docs: Documents, B: int, L: int, K: int) -> list:
    rows = torch.tensor([docs.draw(L)[1] for _ in range(B)], device=model.device)
    lp, ids = top_k(model(rows, torch.arange(L, device=rows.device).expand(B, -1), NoCache()), K)
    mask = torch.ones(B, L, dtype=torch.bool)
    return [(rows[b].cpu(), ids[b].cpu(), lp[b].cpu(), mask[b]) for b in range(B)]


def answer_batch(model, docs: Documents, B: int, L: int, S: int, K: int, new: int, doc_len: int,
                 greedy: bool, gen: torch.Generator, eos: set, rng) -> list:
    """B chat prompts over document slices (one instruction per batch, so every prompt has the same length),
    continued by the teacher for up to `new` tokens, each ending at its first EOS."""
    device = model.device
    code = rng.random() < 0.5
    before, after = chat_parts(model.tokenizer, rng.choice(INSTRUCTIONS[code]))
    doc_len = min(doc_len, model.config.max_position_embeddings - len(before) - len(after) - new)
    if doc_len < 8:
        raise ValueError(f"the target's context ({model.config.max_position_embeddings}) leaves no room for a "
                         f"document in a chat prompt with {new} new tokens")
    drawn = [docs.draw(doc_len, code) for _ in range(B)]
    prompt = torch.tensor([before + d + after for _, d in drawn], device=device)
    P = prompt.shape[1]
    cache = model.new_cache(FullCache, capacity(prompt.tolist(), [GenerationConfig(max_new_tokens=new)]), batch=B)
    lps, idss = [], []

    def label(logits):  # every prompt position's labels, 128 positions per forward
        lp, ids = top_k(logits, K)
        lps.append(lp)
        idss.append(ids)
    last = prefill(model, cache, prompt.tolist(), 128 * B, on_logits=label)
    sp = SamplingParams(0.0 if greedy else 0.8)
    toks, ended = [], torch.full((B,), P + new, dtype=torch.long)
    for t in range(new):
        tok = sample(last, sp, gen)  # [B]
        toks.append(tok)
        for b in range(B):
            if int(tok[b]) in eos and ended[b] > P + t:
                ended[b] = P + t + 1
        if t == new - 1 or bool((ended <= P + t + 1).all()):
            break
        last = model(tok[:, None], torch.full((B, 1), P + t, device=device), cache)[:, -1]
        lp, ids = top_k(last, K)
        lps.append(lp[:, None])
        idss.append(ids[:, None])
    seq, lp, ids = torch.cat([prompt, torch.stack(toks, 1)], 1).cpu(), torch.cat(lps, 1).cpu(), torch.cat(idss, 1).cpu()
    out = []
    for b in range(B):
        n = int(min(ended[b], seq.shape[1]))
        keep = layout(n, L, S)
        labelled = keep < min(n - 1, lp.shape[1])  # the last token (and an EOS) has no next token to predict
        safe = keep.clamp(max=lp.shape[1] - 1)
        out.append((seq[b, keep], ids[b, safe], lp[b, safe], labelled))
    return out


def label(model, part: str, records: int, L: int, S: int, K: int, answer_frac: float, new: int, seed: int,
          draw: str, batch: int = 8, progress: bool = True) -> dict:
    """`records` teacher-labelled sequences of one corpus part, as padded tensors:
    tokens [N, L], ids [N, L, K], logp [N, L, K], mask [N, L] (positions with a label), kind [N] (1 = answer).
    The answers come first, in whole batches of 4 * batch: round(records * answer_frac) rounded up to a multiple of
    4 * batch (at most `records`)."""
    docs, rng = Documents(model.tokenizer, part, seed, draw), random.Random(seed + 1)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    eos = set(model.config.eos_token_ids) | {model.tokenizer.eos_token_id}
    n_answer = round(records * answer_frac)
    rows, kinds, t0, done_tokens = [], [], time.perf_counter(), 0
    with LogBar(total=records, desc=f"teacher ({part})", unit="seq", disable=not progress) as bar:
        while len(rows) < records:
            answer = len(rows) < n_answer
            if answer:  # a wider batch: decode steps cost little more at 32 rows than at 8 on CPU
                got = answer_batch(model, docs, 4 * batch, L, S, K, new, L, greedy=(len(rows) // (4 * batch)) % 2 == 0,
                                   gen=gen, eos=eos, rng=rng)
            else:
                got = text_batch(model, docs, batch, L, K)
            got = got[: records - len(rows)]
            rows += got
            kinds += [int(answer)] * len(got)
            done_tokens += sum(int(r[3].sum()) for r in got)
            bar.set_postfix(tok_s=f"{done_tokens / (time.perf_counter() - t0):.0f}")
            bar.update(len(got))
    N = len(rows)
    out = {"tokens": torch.zeros(N, L, dtype=torch.int32), "ids": torch.zeros(N, L, K, dtype=torch.int32),
           "logp": torch.zeros(N, L, K, dtype=torch.float16), "mask": torch.zeros(N, L, dtype=torch.bool),
           "kind": torch.tensor(kinds, dtype=torch.int8)}
    for i, (tok, ids, lp, mask) in enumerate(rows):
        n = len(tok)
        out["tokens"][i, :n], out["ids"][i, :n], out["logp"][i, :n], out["mask"][i, :n] = tok, ids, lp, mask
    return out
