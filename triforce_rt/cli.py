"""The `triforce` command. Bad input ends with one line on stderr and exit code 2, never a traceback."""
import argparse
import json
import logging
import math
import os
import sys
from dataclasses import fields

from retrieval_cache import KERNELS as ATTENTION_KERNELS

from .distill import DistillConfig
from .distill.corpus import DRAWS
from .engine import generate
from .errors import UserError, first_line
from .jsonl import check_output, output_folder
from .models.loader import drafter_folder, load_drafter
from .runtime import KERNELS, set_threads
from .scheduler import SCHEDULES
from .settings import DRAFTER_MODES, DTYPES, HEAD_MODES, GenerationConfig, check_config
from .textio import TextStream, encode, read_text, summary_line


def add_model_args(p):
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a .gguf file or an HF folder")
    p.add_argument("--dtype", choices=DTYPES, help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, help="CPU threads of torch and the numba kernels (default: torch's choice)")
    p.add_argument("--kernels", choices=KERNELS, default="auto",
                   help="matrix kernels: torch, or numba's CPU kernels, which read a GGUF's Q4_0/Q4_1/Q8_0 blocks in "
                        "place (auto: numba for such a GGUF on the CPU in float32, torch otherwise)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt checkpoints (weights_only load)")
    p.add_argument("--trust-remote-code", action="store_true", help="let transformers run code shipped with the model")
    p.add_argument("--attn", choices=ATTENTION_KERNELS, default="auto",
                   help="attention kernel: torch SDPA; numba's CPU kernel for steps of up to 8 tokens in fp32, which "
                        "reads the cache in place and rotates and writes the new keys in the same call; or "
                        "flash-attn's flash_attn_with_kvcache for one-token CUDA steps (auto: flash where flash-attn "
                        "is installed, numba otherwise; every other step stays on SDPA)")
    gpu = p.add_argument_group("GPU")
    gpu.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                     help="replay fixed-shape tier steps as CUDA graphs (auto: on with --device cuda, unless "
                          "--offload, --tp or dynamic RoPE)")
    gpu.add_argument("--offload", choices=("weights", "kv", "all"),
                     help="keep in pinned host memory and stream to the GPU per layer: the target's layers (weights), "
                          "its full KV cache (kv; the retrieval and drafter caches stay on the GPU), or both (all)")
    gpu.add_argument("--resident-layers", type=int, default=0, metavar="K",
                     help="with --offload weights: the first K layers stay on the GPU")
    gpu.add_argument("--gpu-memory", type=float, metavar="GB",
                     help="cap this process's GPU memory (GiB), e.g. 24 to stand in for an RTX 4090")


def add_generation_args(p, mode: str, max_new_tokens: int = 128):
    """A flag per GenerationConfig field (settings.py: its type, default and help); mode and max_new_tokens take
    the verb's defaults. Values are checked by check_config, before any model loads."""
    spec = p.add_argument_group("speculation (modes other than ar)")
    spec.add_argument("--drafter", default="default", help="tiny drafter of triforce/draft/triforce-ngram, or "
                      "recurrent draft head of the redrafter modes: 'default' (the one shipped for the "
                      "default model) or a path (a model sharing the target's tokenizer; a head made by `triforce "
                      "distill --kind head`)")
    spec.add_argument("--verbose", action="store_true", help="print --mode auto's step costs and each change of plan "
                      "to stderr")
    defaults = {"mode": mode, "max_new_tokens": max_new_tokens}
    for f in fields(GenerationConfig):
        m, flag = f.metadata, "--" + f.name.replace("_", "-")
        group = spec if m["spec"] else p
        default = defaults.get(f.name, f.default)
        if m["kind"] is bool:
            group.add_argument(flag, action="store_true", help=m["help"])
        else:
            group.add_argument(flag, type=m["kind"], default=default, choices=m["choices"], help=m["help"])


def generation_config(args) -> GenerationConfig:
    """The GenerationConfig of parsed generation args, checked before any model loads."""
    cfg = GenerationConfig(**{f.name: getattr(args, f.name) for f in fields(GenerationConfig)})
    check_config(cfg)
    return cfg


def load_models(args):
    """The target and, for the modes that use one, the drafter."""
    from offload import cap_memory
    from retrieval_cache import use_kernel

    from .models import load_model
    from .models.loader import check_device

    set_threads(args.threads)
    cuda = args.device == "cuda"
    if not cuda and (args.offload or args.gpu_memory or args.cuda_graphs == "on"):
        raise UserError("--offload, --gpu-memory and --cuda-graphs on need --device cuda")
    check_device(args.device)  # before the memory cap, which needs CUDA
    if args.attn == "numba" and (cuda or args.dtype not in (None, "float32")):
        raise UserError("--attn numba: the numba attention kernel runs on the CPU in float32; use --attn auto or sdpa")
    try:
        use_kernel(args.attn)
        if args.gpu_memory:
            cap_memory(args.gpu_memory)
    except ValueError as e:
        raise UserError(str(e)) from None
    load = dict(dtype=args.dtype, device=args.device, allow_pickle=args.allow_pickle,
                trust_remote_code=args.trust_remote_code, kernels=args.kernels)
    head = args.mode in HEAD_MODES
    drafter = drafter_folder(args.drafter, args.model, head) if args.mode in DRAFTER_MODES + HEAD_MODES else None
    tp = getattr(args, "tp", 1)  # (the drafter's folder is checked before the target loads)
    model = load_model(args.model, **load, offload=args.offload, resident_layers=args.resident_layers, tp=tp)
    drafter = drafter and load_drafter(drafter, model, **load)
    blocker = "--tp" if tp > 1 else model.runtime.graphs_blocker(model.rope.dynamic)
    if args.cuda_graphs == "on" and blocker:
        raise UserError(f"--cuda-graphs on cannot be combined with {blocker}")
    for m in (model, drafter):  # the drafter follows the target: no graphs where the target has none
        if m is not None and not head:
            m.runtime.cuda_graphs = cuda and args.cuda_graphs != "off" and not blocker
    return model, drafter


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default adds the usage block)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    ap = Parser(prog="triforce", description="Lossless hierarchical speculative decoding for long contexts.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)

    def job(name: str, help: str, mode: str, max_new_tokens: int = 128, **flags):
        """A verb that loads a model and generates: its own flags (name -> add_argument keywords), then the model's
        and the generation settings'."""
        p = sub.add_parser(name, help=help)
        for flag, kw in flags.items():
            p.add_argument(flag, **kw)
        add_model_args(p)
        add_generation_args(p, mode, max_new_tokens)
        return p

    g = job("generate", "generate a continuation of a prompt", "auto",
            **{"--chat": dict(action="store_true", help="wrap the prompt in the model's chat template"),
               "--json": dict(action="store_true", help="print one JSON object with tokens, text and stats"),
               "--tp": dict(type=int, default=1, metavar="N", help="tensor parallel over N processes: torchrun "
                            "--nproc-per-node N -m triforce_rt generate --tp N")})
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    job("summarize", "summarize text or Markdown files with the model's chat template", "auto", 256,
        **{"files": dict(nargs="+", metavar="FILE"),
           "--out": dict(help="write the summaries here instead of stdout"),
           "--fit": dict(choices=("refuse", "truncate", "map-reduce"), default="refuse",
                         help="a document beyond the context: refuse (default), keep its start and end, or "
                              "summarize chunks then the summaries"),
           "--quiet": dict(action="store_true", help="no progress bars")})
    job("batch", "generate for every line of a JSONL file; durable and resumable", "auto",
        **{"input": dict(metavar="INPUT.jsonl"),
           "--out": dict(required=True, metavar="OUTPUT.jsonl", help="appended to; finished ids are skipped"),
           "--chat": dict(action="store_true", help="wrap each 'prompt' in the chat template ('messages' always is)"),
           "--quiet": dict(action="store_true", help="no progress bar (into a log file it updates once a minute)"),
           "--batch-size": dict(type=int, default=1, metavar="B",
                                help="decode up to B lines with the same settings together (batched speculation)"),
           "--schedule": dict(choices=SCHEDULES, default="continuous",
                              help="continuous: a line that ends frees its slot for the next line at once (its "
                                   "prefill interleaved with the others' decoding); static: B lines at a time"),
           "--kv-block": dict(type=int, default=0, metavar="N",
                              help="page the target's KV cache in blocks of N tokens, taken as tokens arrive and "
                                   "given back when a line ends (0: a preallocated cache per line, sized for the "
                                   "longest); N must divide --chunk-size in the modes with a retrieval tier"),
           "--kv-memory": dict(type=float, metavar="GB", help="with --kv-block: at most this much KV; a line waits "
                               "until the blocks it may need are free"),
           "--workers": dict(type=int, metavar="N", help="spread the lines over N model replicas, Ray actors on "
                             "this machine or on --ray-address's cluster (needs pip install 'triforce-rt[ray]')"),
           "--ray-address": dict(metavar="HOST:PORT", help="run the --workers on this running Ray cluster (default "
                                 "with --workers: a local cluster started for the job)")})

    d = sub.add_parser("distill", help="train a drafter for a target by knowledge distillation: a tiny model, or a "
                       "recurrent draft head")
    dc = DistillConfig()
    d.add_argument("--target", default=dc.target, help="'default' or a model path (.gguf or HF folder)")
    d.add_argument("--kind", default=dc.kind, choices=("drafter", "head"),
                   help="drafter: a tiny Llama that sees tokens only (the draft/triforce modes); head: a recurrent "
                   "head on the target's hidden states (ReDrafter; the redrafter modes), trained on records that are "
                   "their own whole context (--seq-len), initialised from the target's head rows")
    d.add_argument("--depth", type=int, default=dc.depth, help="head: drafts unrolled per position in training")
    d.add_argument("--layers", type=int, default=dc.layers)
    d.add_argument("--hidden", type=int, default=dc.hidden, help="width; the target's width starts from its "
                   "embedding rows (--kind head: the width of its feature MLP)")
    d.add_argument("--tokens", type=int, default=dc.tokens, help="teacher-labelled training positions, labelled "
                   "and cached in blocks of 1.5M: a larger value keeps the blocks already labelled")
    d.add_argument("--seq-len", type=int, default=dc.seq_len, help="student sequence: sinks + recent tokens")
    d.add_argument("--vocab", type=int, default=dc.vocab, help="reduced draft vocabulary (most frequent teacher top-1)")
    d.add_argument("--epochs", type=float, default=dc.epochs)
    d.add_argument("--batch", type=int, default=dc.batch, help="sequences per step")
    d.add_argument("--lr", type=float, default=dc.lr)
    d.add_argument("--answer-frac", type=float, default=dc.answer_frac,
                   help="share of on-policy records: a chat prompt and the teacher's own answer")
    d.add_argument("--copy-layers", default=dc.copy_layers, metavar="none|first|I,J,...",
                   help="start the student's layers as copies of these target layers (first: its first --layers; "
                   "a list sets the depth; needs --hidden at the target's width), not at random")
    d.add_argument("--init", metavar="DIR", help="continue from this distilled drafter (its layers, width and draft "
                   "vocabulary; --layers, --hidden, --vocab and --copy-layers are then ignored), e.g. on a longer "
                   "--seq-len")
    d.add_argument("--skip-tokens", type=int, default=dc.skip_tokens, metavar="N",
                   help="train only on the positions after the first N of --tokens (a multiple of 1.5M: whole blocks, "
                   "neither labelled nor loaded). With --init a drafter distilled on those N, this continues it on "
                   "new data at the cost of the new blocks' teacher pass alone")
    d.add_argument("--draw", default=dc.draw, choices=DRAWS,
                   help="how documents are drawn: length (in proportion to their tokens, so long documents are not "
                   "under-represented and short ones not repeated; default) or file (every file alike, as drafters "
                   "distilled before --draw were)")
    d.add_argument("--out", default=dc.out, help="output folder (config.json, model.safetensors, tokenizer)")
    d.add_argument("--seed", type=int, default=dc.seed)
    d.add_argument("--threads", type=int, help="torch CPU threads")
    d.add_argument("--quiet", action="store_true", help="no progress bars (into a log file they update once a minute)")

    r = sub.add_parser("run", help="run a YAML experiment: sweeps, baselines, tables and a plot")
    r.add_argument("experiment", help="the experiment file (see experiments/)")
    r.add_argument("--out", help="output folder (default: runs/<name>/, runs/<name>-quick/ with --quick)")
    r.add_argument("--quick", action="store_true", help="shrink every size for a smoke run")
    r.add_argument("--quiet", action="store_true", help="no progress bar (into a log file it updates once a minute)")

    b = sub.add_parser("bench", help="our AR decode against HF generate (see benchmarks/)")
    b.add_argument("--model", default="default")
    b.add_argument("--contexts", type=int, nargs="+", default=[2048, 8064])
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--kernels", choices=KERNELS, default="auto", help="our model's matrix kernels (as generate's)")
    b.add_argument("--out", help="also write the results as JSON here")
    return ap


def read_prompt(args) -> str:
    if args.prompt_file is not None:
        if not os.path.isfile(args.prompt_file):
            what = "is not a file" if os.path.exists(args.prompt_file) else "not found"
            raise UserError(f"prompt file {what}: {args.prompt_file}")
        text = read_text(args.prompt_file)
    else:
        text = args.prompt
    if not text.strip():
        raise UserError("the prompt is empty")
    return text


def cmd_generate(args):
    cfg = generation_config(args)  # before any model loads
    text = read_prompt(args)
    if args.tp < 1:
        raise UserError(f"--tp must be at least 1 (got {args.tp})")
    rank = 0
    if args.tp > 1:
        from . import parallel

        rank, world = parallel.init(args.tp, args.device)
    model, drafter = load_models(args)
    if args.tp > 1:
        model = parallel.shard(model, rank, world)  # the drafter stays whole on every rank
    ids = encode(model.tokenizer, text, args.chat)
    stream = None if args.json or rank else TextStream(model.tokenizer)
    res = generate(model, ids, cfg, on_token=stream, progress=sys.stderr.isatty() and not rank, drafter=drafter)
    if args.tp > 1:
        parallel.agree(res.tokens)
        parallel.close()
    if rank:
        return
    if args.json:
        print(json.dumps(res.to_json()))
    else:
        print()
    print(summary_line(res), file=sys.stderr)


def cmd_summarize(args):
    from .jobs.summarize import summarize_files

    cfg = generation_config(args)
    for path in args.files:  # every path, before any model loads
        if not os.path.isfile(path):
            raise UserError(f"{'not a file' if os.path.exists(path) else 'file not found'}: {path}")
    if args.out:
        check_output(args.out, args.files)
    model, drafter = load_models(args)
    summarize_files(model, drafter, args.files, cfg, args.fit, args.out, progress=not args.quiet and sys.stderr.isatty())


def cmd_batch(args):
    from .jobs.batch import finished, run_batch
    from .scheduler import check_block, schedule_of

    cfg = generation_config(args)
    if not os.path.isfile(args.input):
        raise UserError(f"input file not found: {args.input}")
    check_output(args.out, [args.input])
    sched = schedule_of(args)
    sched.check(args.offload in ("kv", "all"))
    check_block(cfg, sched.kv_block)  # (a line may not change the mode or the chunk size)
    if args.workers is not None or args.ray_address:
        from .jobs.workers import run_workers

        args.workers = 1 if args.workers is None else args.workers
        counts = run_workers(args, progress=not args.quiet)
        return 1 if counts["errors"] else 0
    done = finished(args.out)
    model, drafter = load_models(args)
    counts = run_batch(model, drafter, args.input, args.out, cfg, args.chat, progress=not args.quiet, sched=sched,
                       done=done)
    return 1 if counts["errors"] else 0


def cmd_distill(args):
    from .distill import distill
    from .models.loader import resolve

    names = {f.name for f in fields(DistillConfig)}
    cfg = DistillConfig(**{k: v for k, v in vars(args).items() if k in names})
    if cfg.kind == "head" and (cfg.init or cfg.copy_layers != "none" or cfg.skip_tokens):
        raise UserError("--kind head takes neither --init, --copy-layers nor --skip-tokens")
    if cfg.kind == "head" and cfg.seq_len <= cfg.depth + 1:
        raise UserError(f"--kind head needs --seq-len > --depth + 1 (got {cfg.seq_len} and {cfg.depth})")
    for name in ("layers", "hidden", "tokens", "seq_len", "vocab", "batch", "depth"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.hidden % 2:
        raise UserError("--hidden must be even (RoPE rotates pairs of dimensions)")
    if cfg.seq_len <= cfg.sinks or not 0 < cfg.epochs < math.inf or not 0 <= cfg.answer_frac <= 1 or not (
            0 < cfg.lr < math.inf):
        raise UserError(f"need --seq-len > {cfg.sinks} (the sinks), finite --epochs > 0 and --lr > 0, and "
                        "0 <= --answer-frac <= 1")
    set_threads(args.threads)
    if cfg.init:
        resolve(cfg.init, "drafter")  # before the target loads
    output_folder(cfg.out, "--out")
    metrics = distill(cfg, progress=not args.quiet)
    print(json.dumps({"out": cfg.out, **metrics}))


def cmd_run(args):
    from .experiment import load, run_experiment

    exp = load(args.experiment)  # validated before any model loads
    out = run_experiment(exp, args.out, args.quick, progress=not args.quiet)
    print(f"results in {out}/ (results.jsonl, results.md, results.csv, plot.png)", file=sys.stderr)


def cmd_bench(args):
    from .measure import run_ar_vs_hf

    run_ar_vs_hf(args.model, args.contexts, args.new_tokens, args.threads, args.out, args.kernels)


def main(argv=None):
    args = build_parser().parse_args(argv)
    log = logging.getLogger("triforce_rt")  # --verbose: --mode auto's step costs and plan switches, on stderr
    handler = logging.StreamHandler(sys.stderr)
    if getattr(args, "verbose", False):
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        return run_command(args)
    finally:
        log.removeHandler(handler)


def run_command(args) -> int:
    try:
        commands = {"generate": cmd_generate, "summarize": cmd_summarize, "batch": cmd_batch, "distill": cmd_distill,
                    "run": cmd_run, "bench": cmd_bench}
        rc = commands[args.command](args)  # None, or batch's 1 when some lines ended as error records
    except UserError as e:
        print(f"triforce: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("triforce: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # CUDA OOM gets a hint; everything else is a bug and keeps its traceback
        if type(e).__name__ == "OutOfMemoryError":
            print(f"triforce: error: CUDA out of memory ({first_line(e)}); try --offload weights|kv|all (with --resident-layers K), "
                  "a shorter prompt, fewer new tokens or --dtype bfloat16", file=sys.stderr)
            return 2
        raise
    return rc or 0
