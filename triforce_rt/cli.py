"""The `triforce` command. Bad input ends with one line on stderr and exit code 2, never a traceback."""
import argparse
import json
import os
import sys

from .engine import DRAFTER_MODES, MODES, GenerationConfig, check_config, generate
from .errors import UserError

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def add_model_args(p):
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a .gguf file or an HF folder")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt checkpoints (weights_only load)")
    p.add_argument("--trust-remote-code", action="store_true", help="let transformers run code shipped with the model")


def add_spec_args(p):
    d = GenerationConfig()
    s = p.add_argument_group("speculation (modes other than ar)")
    s.add_argument("--drafter", default="default", help="tiny drafter of triforce/draft: 'default' or a model path "
                                                         "sharing the target's tokenizer")
    s.add_argument("--budget", type=int, help="retrieval cache tokens (default: 4096, at most 1/8 of the prompt; "
                                               "an explicit value is capped at the prompt)")
    s.add_argument("--chunk-size", type=int, default=d.chunk_size, help="retrieval chunk size")
    s.add_argument("--gamma1", type=int, default=d.gamma1, help="drafter tokens per tier-2 verification (triforce)")
    s.add_argument("--gamma2", type=int, default=d.gamma2, help="tokens per target verification")
    s.add_argument("--sinks", type=int, default=d.sinks, help="StreamingLLM attention sinks")
    s.add_argument("--window", type=int, help="StreamingLLM window (default: 240 for a drafter, budget - sinks "
                                              "for streaming-spec)")
    s.add_argument("--refresh", type=int, default=d.refresh, help="re-select the retrieval cache every N new "
                                                                  "tokens (0 = never)")
    s.add_argument("--draft-dtype", choices=DTYPE_NAMES, help="dtype of the drafting tiers (default: the target's); "
                                                              "verification keeps the output exact")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default adds the usage block)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    ap = Parser(prog="triforce", description="Lossless hierarchical speculative decoding for long contexts.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)

    g = sub.add_parser("generate", help="generate a continuation of a prompt")
    add_model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    g.add_argument("--mode", default="ar", choices=MODES,
                   help="ar: target only; triforce: drafter -> target+retrieval -> target; self-spec: "
                        "target+retrieval -> target; streaming-spec: target+StreamingLLM -> target; draft: drafter -> target")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--prefill-chunk", type=int, default=1024, help="prompt tokens per prefill forward")
    g.add_argument("--json", action="store_true", help="print one JSON object with tokens, text and stats")
    add_spec_args(g)

    b = sub.add_parser("bench", help="our AR decode against HF generate (see benchmarks/)")
    b.add_argument("--model", default="default")
    b.add_argument("--contexts", type=int, nargs="+", default=[2048, 8064])
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--out", help="also write the results as JSON here")
    return ap


def read_prompt(args) -> str:
    if args.prompt_file is not None:
        if not os.path.isfile(args.prompt_file):
            raise UserError(f"prompt file not found: {args.prompt_file}")
        with open(args.prompt_file, encoding="utf-8", errors="replace") as f:
            text = f.read()
    else:
        text = args.prompt
    if not text.strip():
        raise UserError("the prompt is empty")
    return text


def encode(tokenizer, text: str, chat: bool) -> list:
    if chat:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"])
    return tokenizer(text).input_ids


class TextStream:
    """Prints decoded text as tokens arrive, holding back an incomplete UTF-8 sequence."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.shown = tokenizer, [], 0

    def __call__(self, token_id: int):
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[self.shown:])
            sys.stdout.flush()
            self.shown = len(text)


def cmd_generate(args):
    import torch

    from .models import load_model

    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise UserError("need --temperature >= 0, 0 < --top-p <= 1 and --top-k >= 0")
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos, mode=args.mode,
                           prefill_chunk=args.prefill_chunk, budget=args.budget, chunk_size=args.chunk_size,
                           gamma1=args.gamma1, gamma2=args.gamma2, sinks=args.sinks, window=args.window,
                           refresh=args.refresh, draft_dtype=args.draft_dtype)
    check_config(cfg)  # before any model loads
    text = read_prompt(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = dict(dtype=args.dtype, device=args.device, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    model = load_model(args.model, **load)
    drafter = load_drafter(args.drafter, load) if args.mode in DRAFTER_MODES else None
    ids = encode(model.tokenizer, text, args.chat)
    res = generate(model, ids, cfg, on_token=None if args.json else TextStream(model.tokenizer),
                   progress=sys.stderr.isatty(), drafter=drafter)
    if args.json:
        print(json.dumps(res.to_json()))
    else:
        print()
    print(summary_line(res), file=sys.stderr)


def summary_line(res) -> str:
    """One line: prefill, decode speed and, for speculative modes, each drafting tier's acceptance."""
    line = (f"[{res.mode}] prompt {res.prompt_tokens} tok, prefill {res.prefill_seconds:.2f} s | "
            f"{res.new_tokens} new tok, decode {res.decode_tokens_per_second:.1f} tok/s")
    if len(res.tiers) > 1:
        rates = ", ".join(f"{t['name']} {t['accepted']}/{t['drafted']}" for t in res.tiers[:-1])
        line += f" | accepted {rates}; {res.tokens_per_target_call:.2f} tok/target call"
    return line


def load_drafter(spec: str, load: dict):
    from .models import load_model

    if spec == "default":
        raise UserError("no default drafter exists for this model yet; pass --drafter PATH (a small model that "
                        "shares the target's tokenizer), or use --mode self-spec")
    return load_model(spec, **load)


def cmd_bench(args):
    from .bench import run_ar_vs_hf

    run_ar_vs_hf(args.model, args.contexts, args.new_tokens, args.threads, args.out)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        {"generate": cmd_generate, "bench": cmd_bench}[args.command](args)
    except UserError as e:
        print(f"triforce: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("triforce: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # CUDA OOM gets a hint; everything else is a bug and keeps its traceback
        if type(e).__name__ == "OutOfMemoryError":
            print(f"triforce: error: CUDA out of memory ({e}); use a shorter prompt, fewer new tokens, "
                  "or --dtype bfloat16", file=sys.stderr)
            return 2
        raise
    return 0
