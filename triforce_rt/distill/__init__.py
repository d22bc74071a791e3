"""`triforce distill`: a drafter for a target with no small sibling, by knowledge distillation.

--kind drafter: a tiny Llama (train.py) that sees tokens only; --kind head: ReDrafter's recurrent head (head.py) on the
target's hidden states. corpus.py (real text, train / held-out split), teacher.py (the target's top-K distributions,
cached on disk; head.py's teacher pass adds the hidden states). distill() labels, trains and writes a folder that
--drafter accepts.
"""
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace

import torch

from ..errors import UserError
from ..models.head import RecurrentHead
from ..models.loader import cache_root, load_model, resolve, stamp, weight_files
from .corpus import fingerprint
from .head import evaluate_head, label_head, train_head
from .teacher import label
from .train import copied_layers, evaluate, init_student, pick_vocab, student_config, train


@dataclass
class DistillConfig:
    target: str = "default"
    layers: int = 2
    hidden: int = 576
    tokens: int = 1_500_000  # teacher-labelled student positions (records = tokens / seq_len)
    seq_len: int = 256  # student sequence: sinks + recent tokens, the drafter's StreamingCache (window) at decode
    out: str = "drafter"
    seed: int = 0
    vocab: int = 6144  # reduced draft vocabulary
    epochs: float = 8.0
    batch: int = 32
    lr: float = 2e-3
    top_k: int = 16  # teacher log-probabilities kept per position
    answer_frac: float = 0.4  # share of on-policy records (chat prompt + the teacher's own answer)
    new_tokens: int = 96  # answer length cap
    sinks: int = 16
    init: str | None = None  # a drafter made by distill to continue from (its shape and draft vocabulary)
    copy_layers: str = "none"  # the target layers the student starts from: none (random), first, or a list: 0,29
    draw: str = "length"  # how documents are drawn: length (in proportion to their tokens) or file (each file alike)
    skip_tokens: int = 0  # train on the blocks after the first skip_tokens positions only (e.g. to continue --init)
    kind: str = "drafter"  # drafter (a tiny Llama) or head (a recurrent head on the target's hidden states)
    depth: int = 5  # head: drafts unrolled per anchor in training


BLOCK_TOKENS = 1_500_000  # teacher data is labelled and cached in blocks of this many positions


def teacher_block(model, cfg: DistillConfig, part: str, records: int, block: int, corpus: str, progress: bool) -> dict:
    """label() for one block of one part, cached under $TRIFORCE_CACHE/distill/ by everything that determines it:
    the settings, the target's weight files (name, size, mtime, as for a converted GGUF) and the part's contents
    (corpus: its fingerprint, hashed once per part by the caller).
    Block k draws its documents with seed + 7919 k, so a larger --tokens keeps the blocks already labelled."""
    from safetensors.torch import load_file, save_file

    safe, pickles = weight_files(model.source)
    weights = [(os.path.basename(f), *stamp(f)) for f in safe + pickles]
    key = dict(target=os.path.realpath(model.source), weights=weights, dtype=str(model.embed_tokens.weight.dtype),
               part=part, records=records, seq_len=cfg.seq_len, sinks=cfg.sinks, top_k=cfg.top_k,
               answer_frac=cfg.answer_frac, new_tokens=cfg.new_tokens, seed=cfg.seed, draw=cfg.draw, block=block,
               corpus=corpus, version=2)
    if cfg.kind == "head":  # records that are their own whole context, with the hidden states (no sinks)
        key.update(kind="head", sinks=0)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_root(), "distill", f"teacher-{part}-{digest}.safetensors")
    if os.path.isfile(path):
        return load_file(path)
    seed = cfg.seed + (part == "heldout") + 7919 * block
    if cfg.kind == "head":
        data = label_head(model, part, records, cfg.seq_len, cfg.top_k, cfg.answer_frac, cfg.new_tokens, seed,
                          cfg.draw, progress=progress)
    else:
        data = label(model, part, records, cfg.seq_len, cfg.sinks, cfg.top_k, cfg.answer_frac, cfg.new_tokens, seed,
                     cfg.draw, progress=progress)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(data, path + ".tmp")
    os.replace(path + ".tmp", path)
    return data


def block_records(cfg: DistillConfig) -> int:
    """Records in a full block of teacher data."""
    return max(cfg.batch, BLOCK_TOKENS // cfg.seq_len)


def block_sizes(cfg: DistillConfig) -> list:
    """Records of each training block: --tokens // --seq-len in blocks of block_records(cfg), the last one partial."""
    records, per_block = max(cfg.batch, cfg.tokens // cfg.seq_len), block_records(cfg)
    return [min(per_block, records - start) for start in range(0, records, per_block)]


def first_block(cfg: DistillConfig) -> int:
    """The first training block: --skip-tokens leaves out whole blocks, which are then neither labelled nor loaded."""
    first, rest = divmod(cfg.skip_tokens, BLOCK_TOKENS)
    if rest or not 0 <= first < len(block_sizes(cfg)):
        raise UserError(f"--skip-tokens {cfg.skip_tokens}: need a multiple of {BLOCK_TOKENS:,} (whole blocks of "
                        f"teacher data) that leaves some of --tokens {cfg.tokens:,}")
    return first


def teacher_data(model, cfg: DistillConfig, progress: bool) -> tuple:
    """(train, held-out) teacher data: the training blocks from first_block(cfg) on, and a held-out part of 1/20 of
    the first block, the same for every --tokens and --skip-tokens."""
    sizes, corpus = block_sizes(cfg), fingerprint("train")
    blocks = [teacher_block(model, cfg, "train", n, k, corpus, progress)
              for k, n in enumerate(sizes) if k >= first_block(cfg)]
    train_data = {k: torch.cat([b[k] for b in blocks]) for k in blocks[0]}
    held = teacher_block(model, cfg, "heldout", max(16, sizes[0] // 20), 0, fingerprint("heldout"), progress)
    return train_data, held


def save(student, target, cfg: DistillConfig, metrics: dict) -> None:
    from safetensors.torch import save_file

    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(target.source, "config.json")) as f:
        config = json.load(f)
    c = student.config
    config.update(num_hidden_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
                  intermediate_size=c.intermediate_size, num_attention_heads=c.num_attention_heads,
                  num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                  max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=True,
                  draft_vocab=c.draft_vocab, torch_dtype="bfloat16", dtype="bfloat16")
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous().cpu()
          for k, v in student.state_dict().items()}
    save_file(sd, os.path.join(cfg.out, "model.safetensors"))
    target.tokenizer.save_pretrained(cfg.out)
    with open(os.path.join(cfg.out, "distill.json"), "w") as f:
        json.dump({"config": asdict(cfg), "heldout": metrics}, f, indent=2)


def continued_student(path: str, teacher, seq_len: int):
    """The drafter at path in fp32 (its parameters load trainable), its context set to seq_len: training goes on
    from its weights and draft vocabulary (e.g. on longer records, to widen the window it was trained for)."""
    student = load_model(resolve(path, "drafter"), dtype=torch.float32)
    if student.vocab_ids is None or student.config.vocab_size != teacher.config.vocab_size:
        raise UserError(f"--init {path}: not a reduced-vocabulary drafter for this target (make one with `triforce "
                        "distill`)")
    student.config = replace(student.config, max_position_embeddings=seq_len)
    return student.setup_rope()


def distill(cfg: DistillConfig, progress: bool = True) -> dict:
    """Label, train, evaluate on held-out text and save; returns the held-out metrics."""
    first_block(cfg)  # a bad --skip-tokens fails before the target loads
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_model(cfg.target, dtype="bfloat16", device=device)  # labels only: bf16 is 3x faster on CPU
    if cfg.kind == "head":
        return distill_head(teacher, cfg, device, progress)
    student = continued_student(cfg.init, teacher, cfg.seq_len) if cfg.init else None  # checked before labelling
    tc = teacher.config
    copied = [] if cfg.init else copied_layers(cfg.copy_layers, cfg.layers, cfg.hidden, tc.num_hidden_layers,
                                               tc.hidden_size)
    t0 = time.perf_counter()
    data, held = teacher_data(teacher, cfg, progress)
    label_s = time.perf_counter() - t0
    if student is None:
        eos = set(tc.eos_token_ids) | {teacher.tokenizer.eos_token_id}
        vocab_ids = pick_vocab(data, cfg.vocab, {t for t in eos if t is not None})
        layers = len(copied) or cfg.layers
        scfg = student_config(tc, layers, cfg.hidden, len(vocab_ids), cfg.seq_len, copied=bool(copied))
        student = init_student(teacher, scfg, vocab_ids, cfg.seed, copied)
    # the --init drafter's held-out agreement on these (longer) records, before it trains on them
    init_agreement = evaluate(student.to(device), held, device)["agreement"] if cfg.init else None
    t0 = time.perf_counter()
    student, (loss_first, loss_last) = train(student, data, cfg.epochs, cfg.batch, cfg.lr, cfg.seed, device, progress)
    metrics = evaluate(student, held, device)
    metrics.update(teacher_seconds=round(label_s, 1), train_seconds=round(time.perf_counter() - t0, 1),
                   train_positions=int(data["mask"].sum()), parameters=sum(p.numel() for p in student.parameters()),
                   train_loss_first=round(loss_first, 4), train_loss_last=round(loss_last, 4))
    if cfg.init:
        metrics["init_agreement"] = init_agreement
    save(student, teacher, cfg, metrics)
    return metrics


def distill_head(teacher, cfg: DistillConfig, device, progress: bool) -> dict:
    """--kind head: the teacher pass with hidden states, then the head (its feature MLP --hidden wide), initialised
    from the target's head rows of the kept vocabulary; saved with its held-out metrics."""
    tc = teacher.config
    t0 = time.perf_counter()
    data, held = teacher_data(teacher, cfg, progress)
    label_s = time.perf_counter() - t0
    eos = {t for t in set(tc.eos_token_ids) | {teacher.tokenizer.eos_token_id} if t is not None}
    vocab_ids = pick_vocab(data, cfg.vocab, eos)
    torch.manual_seed(cfg.seed)
    head = RecurrentHead(tc.hidden_size, tc.vocab_size, len(vocab_ids), tc.rms_norm_eps, ffn=cfg.hidden)
    head.initialize(teacher.head.cpu(), vocab_ids).to(device)
    embed = teacher.embed_tokens.float().requires_grad_(False)
    t0 = time.perf_counter()
    head, (loss_first, loss_last) = train_head(head, embed, data, cfg.epochs, cfg.batch, cfg.lr, cfg.depth, cfg.seed,
                                               progress)
    metrics = evaluate_head(head, embed, held, cfg.depth)
    metrics.update(teacher_seconds=round(label_s, 1), train_seconds=round(time.perf_counter() - t0, 1),
                   train_positions=int(data["mask"].sum()), parameters=sum(p.numel() for p in head.parameters()),
                   train_loss_first=round(loss_first, 4), train_loss_last=round(loss_last, 4))
    head.save(cfg.out, {"distill": asdict(cfg), "heldout": metrics})
    return metrics
