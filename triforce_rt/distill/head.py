"""`triforce distill --kind head`: ReDrafter's recurrent draft head (models/head.py), distilled from the target.

Teacher pass (label_head): records of L tokens whose whole context is the record itself, so that the target's
final-norm hidden states H [L, D] and its top-K log-probabilities come from one forward each:
  text    a slice of a document;
  answer  a chat request over a document slice and the target's own answer (greedy, or T = 0.8 every other batch),
          the prompt short enough that prompt + answer fit in L.
Training (train_head), teacher-forced over every anchor a of a record at once: h = H[a], x_1 = token a+1, and for
j = 1..depth the head steps on token a+j and is scored against the teacher's distribution at position a+j (that of
token a+j+1), by soft cross-entropy against the top-K renormalised over the kept vocabulary (train.soft_ce, the
drafter's loss: KL plus a constant), through train.optimize. The target's embedding and hidden states are inputs
only (frozen).
"""
import random
import time

import torch
import torch.nn.functional as F

from retrieval_cache import NoCache

from ..models.head import RecurrentHead
from ..models.llama import kept_rows
from ..textio import LogBar
from .corpus import Documents
from .teacher import INSTRUCTIONS, answer_batch, chat_parts, top_k
from .train import optimize, soft_ce


def label_head(model, part: str, records: int, L: int, K: int, answer_frac: float, new: int, seed: int, draw: str,
               batch: int = 8, progress: bool = True) -> dict:
    """tokens [N, L], hidden [N, L, D] (bf16), ids [N, L, K], logp [N, L, K], mask [N, L] (positions with a label and
    a hidden state), kind [N] (1 = answer). Answers first, in whole batches of 4 * batch."""
    docs, rng = Documents(model.tokenizer, part, seed, draw), random.Random(seed + 1)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    eos = set(model.config.eos_token_ids) | {model.tokenizer.eos_token_id}
    n_answer = round(records * answer_frac)
    longest_chat = max(sum(map(len, chat_parts(model.tokenizer, i))) for kind in INSTRUCTIONS.values() for i in kind)
    doc_len = L - new - longest_chat
    if n_answer and doc_len < 8:
        raise ValueError(f"--seq-len {L} leaves no room for a document beside a chat request and {new} new tokens")
    N, D = records, model.config.hidden_size
    out = {"tokens": torch.zeros(N, L, dtype=torch.int32), "hidden": torch.zeros(N, L, D, dtype=torch.bfloat16),
           "ids": torch.zeros(N, L, K, dtype=torch.int32), "logp": torch.zeros(N, L, K, dtype=torch.float16),
           "mask": torch.zeros(N, L, dtype=torch.bool), "kind": torch.zeros(N, dtype=torch.int8)}
    done, t0, positions = 0, time.perf_counter(), 0
    with LogBar(total=records, desc=f"teacher ({part})", unit="seq", disable=not progress) as bar:
        while done < records:
            answer = done < n_answer
            if answer:  # prompt + answer fit in L, so every record is its own whole context
                got = answer_batch(model, docs, 4 * batch, L, 0, K, new, doc_len,
                                   greedy=(done // (4 * batch)) % 2 == 0, gen=gen, eos=eos, rng=rng)
                tokens = torch.zeros(len(got), L, dtype=torch.long)
                for i, (tok, *_) in enumerate(got):
                    tokens[i, : len(tok)] = tok
                mask = torch.stack([F.pad(m, (0, L - len(m))) for *_, m in got])
            else:
                tokens = torch.tensor([docs.draw(L)[1] for _ in range(batch)])
                mask = torch.ones(batch, L, dtype=torch.bool)
                mask[:, -1] = False  # the last token's next one is not in the record
            n = min(len(tokens), records - done)
            tokens, mask = tokens[:n], mask[:n]
            with torch.inference_mode():
                dev = model.device
                h = model.hidden(tokens.to(dev), torch.arange(L, device=dev).expand(n, -1), NoCache())
                lp, ids = map(torch.cat, zip(*[top_k(model.score(r[None]), K) for r in h]))  # a record's [L, V] at a time
            sl = slice(done, done + n)
            out["tokens"][sl], out["hidden"][sl] = tokens, h.bfloat16().cpu()
            out["ids"][sl], out["logp"][sl] = ids.cpu(), lp.cpu()
            out["mask"][sl], out["kind"][sl] = mask, int(answer)
            done += n
            positions += int(mask.sum())
            bar.set_postfix(tok_s=f"{positions / (time.perf_counter() - t0):.0f}")
            bar.update(n)
    return out


def unroll(head: RecurrentHead, E: torch.Tensor, H: torch.Tensor, depth: int):
    """Teacher-forced drafts from every anchor: E, H [B, L, D] (token embeddings, hidden states). Yields, for j = 1..
    depth, the reduced logits [B, L - j, R] of draft j+1 from anchors a = 0..L-j-1 (scored against position a + j)."""
    WE, s = head.W(E), None  # W e for every token at once
    L = E.shape[1]
    for j in range(1, depth + 1):
        x = WE[:, j:]
        s = F.silu(x if s is None else x + head.U(s[:, : L - j]))  # [B, L - j, D]: anchor a steps on token a + j
        yield head.reduced_logits(s, H[:, : L - j])


def batch_loss(head, embed, b: dict, index, depth: int) -> tuple:
    """Mean soft cross-entropy over every (anchor, depth) with a label, and the number of anchors."""
    R = len(head.vocab_ids)
    E, H = embed(b["tokens"].long()).float(), b["hidden"].float()
    total, count = 0.0, 0
    for j, logits in enumerate(unroll(head, E, H, depth), start=1):
        m = b["mask"][:, j:]
        ce = soft_ce(logits, b["ids"][:, j:], b["logp"][:, j:], index, R)
        total = total + (ce * m).sum()
        count += int(m.sum())
    return total / max(count, 1), int(b["mask"].sum())


def train_head(head, embed, data: dict, epochs: float, batch: int, lr: float, depth: int, seed: int,
               progress: bool = True) -> tuple:
    """train.optimize() the head on batch_loss; embed: ids -> [.., D] (frozen). Positions/s counts anchors."""
    index = kept_rows(head.vocab_ids, head.vocab_size)
    return optimize(head, data, epochs, batch, lr, seed, head.vocab_ids.device,
                    lambda b: batch_loss(head, embed, b, index, depth), "distill head", progress)


@torch.no_grad()
def evaluate_head(head, embed, data: dict, depth: int, batch: int = 16) -> dict:
    """Teacher-forced top-1 agreement with the teacher at each draft depth j (depth 1 is the first draft), and the
    mean run of agreeing drafts from an anchor (at most depth): the accepted drafts per verification if the target
    decoded greedily along this text."""
    index = kept_rows(head.vocab_ids, head.vocab_size)
    agree, total = torch.zeros(depth), torch.zeros(depth)
    run_sum, anchors = 0.0, 0
    for s in range(0, len(data["tokens"]), batch):
        b = {k: v[s : s + batch] for k, v in data.items()}
        E, H = embed(b["tokens"].long()).float(), b["hidden"].float()
        L = E.shape[1]
        alive = b["mask"][:, depth:]  # [B, L - depth]: anchors with a label at every depth
        anchors += int(alive.sum())
        for j, logits in enumerate(unroll(head, E, H, depth), start=1):
            m = b["mask"][:, j:]
            hit = (logits.argmax(-1) == index[b["ids"][:, j:, 0].long()]) & m  # [B, L - j]
            agree[j - 1] += hit.sum()
            total[j - 1] += m.sum()
            alive = alive & hit[:, : L - depth]  # the drafts 1..j all agree
            run_sum += float(alive.sum())
    return {"agreement": [round(float(a / t), 4) if t else None for a, t in zip(agree, total)],
            "mean_run": round(run_sum / max(anchors, 1), 3), "positions": int(total[0])}
