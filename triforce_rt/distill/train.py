"""The student: a small Llama sharing the target's tokenizer, trained to match the teacher's distributions.

Loss per position: cross-entropy of the student against the teacher's top-K distribution restricted to the
student's vocabulary and renormalised, -Σ_i p_i log q(i), which is KL(p || q) plus a constant.
The student keeps R tokens (the teacher's most frequent top-1 tokens). Its embedding, tied to its head, starts as
the target's rows for them when the widths match, and trains with the rest: measured on SmolLM2, a frozen head
held held-out agreement to 0.38 after 3 epochs. Its layers start random, or (--copy-layers) as copies of some of
the target's, which then set their shapes: faster early training, about the same after 8 epochs on SmolLM2
(triforce_rt/drafters/README.md).
"""
import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from retrieval_cache import NoCache

from ..errors import UserError
from ..models.llama import Transformer
from ..textio import LogBar


def student_config(target_cfg, layers: int, hidden: int, vocab: int, context: int, copied: bool):
    """copied: the student's layers start as target layers, so they take the target's attention and MLP shapes."""
    common = dict(num_hidden_layers=layers, max_position_embeddings=context, tie_word_embeddings=True,
                  draft_vocab=vocab, sliding_window=None)
    if copied:
        return dataclasses.replace(target_cfg, **common)
    heads = max(1, hidden // target_cfg.head_dim)
    return dataclasses.replace(
        target_cfg, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 3), head_dim=hidden // heads, **common)


def copied_layers(spec: str, layers: int, hidden: int, target_layers: int, target_hidden: int) -> list:
    """The target layers the student's layers start from, in order: none ('none'), the first `layers` ('first')
    or the listed ones ('0,29'), which then set the student's depth. Copies need the target's width."""
    if spec == "none":
        return []
    try:
        picked = list(range(layers)) if spec == "first" else [int(x) for x in spec.split(",")]
    except ValueError:
        raise UserError(f"--copy-layers {spec}: expected 'none', 'first' or target layer numbers like 0,1") from None
    if not all(0 <= i < target_layers for i in picked):
        raise UserError(f"--copy-layers {spec} with --layers {layers}: the target has layers 0 to {target_layers - 1}")
    if hidden != target_hidden:
        raise UserError(f"--copy-layers {spec} needs --hidden {target_hidden} (the target's width)")
    return picked


def pick_vocab(data: dict, R: int, must: set) -> torch.Tensor:
    """The R token ids the teacher most often ranks first on labelled positions, plus `must` (EOS)."""
    top1 = data["ids"][..., 0][data["mask"]].long()
    counts = torch.bincount(top1, minlength=max(must) + 1 if must else 1).float()
    for t in must:
        counts[t] = float("inf")
    R = min(R, int((counts > 0).sum()))
    return counts.topk(R).indices.sort().values


def init_student(target, cfg, vocab_ids: torch.Tensor, seed: int, copied: list) -> Transformer:
    """Random weights, then the target's embedding rows and norm when the widths match, and the target layers
    `copied` (student layer i <- target layer copied[i])."""
    torch.manual_seed(seed)
    student = Transformer(cfg)
    for name, p in student.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    student.vocab_ids = vocab_ids.clone()
    with torch.no_grad():
        if cfg.hidden_size == target.config.hidden_size:
            emb = target.embed_tokens.weight.detach().float().cpu()
            rest = torch.ones(len(emb), dtype=torch.bool)
            rest[vocab_ids] = False
            student.embed_tokens.weight.copy_(torch.cat([emb[vocab_ids], emb[rest].mean(0, keepdim=True)]))
            student.norm.weight.copy_(target.norm.weight.float())  # the target's output scale for those rows
        for i, theirs in enumerate(copied):  # len(copied) == num_hidden_layers when copying
            student.layers[i].load_state_dict(target.layers[theirs].state_dict())
    return student.setup_rope()


def soft_ce(logits: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor, index: torch.Tensor, R: int) -> torch.Tensor:
    """-Σ_i p_i log q(i) per position: logits [..., R] over the kept tokens; p the teacher's top-K (ids, logp
    [..., K]) restricted to the kept tokens (index: token -> kept row, R for the others) and renormalised."""
    logq = logits.float().log_softmax(-1)
    r = index[ids.long()]  # [..., K] student row of each teacher token; R = not kept
    p = logp.float().exp() * (r < R)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(p * logq.gather(-1, r.clamp(max=R - 1))).sum(-1)


def batch_loss(student, batch: dict, index: torch.Tensor, R: int) -> tuple:
    """Mean soft cross-entropy over labelled positions, and the number of those positions."""
    tokens = batch["tokens"].long()
    B, L = tokens.shape
    h = student.hidden(tokens, torch.arange(L, device=tokens.device).expand(B, -1), NoCache())
    ce = soft_ce(F.linear(h, student.head), batch["ids"], batch["logp"], index, R)  # [B, L]
    mask = batch["mask"]
    return (ce * mask).sum() / mask.sum().clamp_min(1), mask.sum()


def train(student, data: dict, epochs: float, batch: int, lr: float, seed: int, device, progress: bool = True):
    """optimize() the student on the soft cross-entropy of its logits."""
    student.to(device)
    index, R = student.vocab_index, student.config.draft_vocab
    return optimize(student, data, epochs, batch, lr, seed, device, lambda b: batch_loss(student, b, index, R),
                    "distill", progress)


def optimize(module, data: dict, epochs: float, batch: int, lr: float, seed: int, device, loss_of, desc: str,
             progress: bool = True):
    """AdamW with a linear warm-up and a cosine decay to 10%; bf16 autocast; loss_of(batch) -> (loss, positions).
    Returns the module (eval mode) and the training loss (a 2% moving average) after the first step and the last."""
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    N = len(data["tokens"])
    steps = max(1, math.ceil(epochs * N / batch))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(N, generator=g) for _ in range(math.ceil(epochs) + 1)])
    t0, seen, ema, first = time.perf_counter(), 0, None, None
    with LogBar(total=steps, desc=desc, unit="step", disable=not progress) as bar:
        for s in range(steps):
            idx = order[s * batch : (s + 1) * batch]
            b = {k: v[idx].to(device) for k, v in data.items() if k != "kind"}
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss, n = loss_of(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            seen += int(n)
            loss = float(loss.detach())
            ema = loss if ema is None else 0.98 * ema + 0.02 * loss
            first = ema if first is None else first
            bar.set_postfix(loss=f"{ema:.3f}", tok_s=f"{seen / (time.perf_counter() - t0):.0f}")
            bar.update(1)
    return module.eval(), (first, ema)


@torch.no_grad()
def evaluate(student, data: dict, device, batch: int = 16) -> dict:
    """Teacher-forced top-1 agreement on labelled positions, per record kind, and the kept-vocabulary coverage."""
    index, R = student.vocab_index, student.config.draft_vocab
    was = student.training
    student.train(False)
    agree, total = torch.zeros(2), torch.zeros(2)
    covered = 0
    for s in range(0, len(data["tokens"]), batch):
        b = {k: v[s : s + batch].to(device) for k, v in data.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16):
            tokens = b["tokens"].long()
            B, L = tokens.shape
            h = student.hidden(tokens, torch.arange(L, device=device).expand(B, -1), NoCache())
            top = F.linear(h, student.head).argmax(-1)  # [B, L] student rows
        r0 = index[b["ids"][..., 0].long()]
        hit = (top == r0) & b["mask"]
        covered += int(((r0 < R) & b["mask"]).sum())
        for kind in (0, 1):
            rows = (b["kind"] == kind).cpu()
            agree[kind] += hit.cpu()[rows].sum()
            total[kind] += b["mask"].cpu()[rows].sum()
    student.train(was)
    n = float(total.sum())
    return {"agreement": float(agree.sum()) / max(n, 1),
            "agreement_text": float(agree[0] / total[0]) if total[0] else None,
            "agreement_answer": float(agree[1] / total[1]) if total[1] else None,
            "vocab_coverage": covered / max(n, 1), "positions": int(n)}
