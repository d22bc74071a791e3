"""The experiment file: YAML checked against a typed schema before any model loads.

Every error is one line naming the key (e.g. "sweep.budget[1]: expected an integer, got 'big'").
Paths may start with {stdlib}, {licenses} or {docs} (a file of the shipped corpus, distill/corpus.py, the same on
every machine) or be relative to the experiment file.
"""
import os
import reprlib
from dataclasses import dataclass, field, fields

from ..errors import UserError
from ..runtime import KERNELS, check_threads
from ..settings import MODES, SETTINGS, check_setting

# Sweepable keys and their types: `context` (prompt tokens, cut from the document), then the GenerationConfig fields
# that settings.py marks sweepable, in their declared order (the report's column order).
SWEEP = {"context": int, **{name: m["kind"] for name, m in SETTINGS.items() if m["sweep"]}}
BASELINES = ("hf-generate", "hf-assisted")
MAX_RUNS = 10_000  # rows an experiment may expand to, counted before expansion


@dataclass
class Prompt:
    files: list  # one or more documents; each gives its own rows
    text: str | None = None
    tokens: int | None = None  # cut each document to its first N tokens (the sweep's `context` overrides it)


@dataclass
class Experiment:
    name: str
    prompt: Prompt
    model: str = "default"
    drafter: str | None = None
    head: str | None = None  # the recurrent draft head of the redrafter modes (default: the one shipped)
    chat: bool = False
    instruction: str | None = None  # with chat: the request put before the document
    max_new_tokens: int = 128
    ignore_eos: bool = True
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    modes: list = field(default_factory=lambda: ["ar"])
    sweep: dict = field(default_factory=dict)
    repeats: int = 1
    baselines: list = field(default_factory=list)
    threads: int | None = None
    kernels: str = "auto"  # matrix kernels of the models (--kernels)
    source: str = ""  # the experiment file


def _type_name(t) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[t]


def _check(key: str, value, t):
    ok = (isinstance(value, t) and not (t is int and isinstance(value, bool))) or (
        t is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise UserError(f"{key}: expected {_type_name(t)}, got {reprlib.repr(value)}")
    return float(value) if t is float else value


def _mapping(key: str, value, allowed) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"{key}: expected a mapping of keys to values, got {reprlib.repr(value)}")
    for k in value:
        if k not in allowed:
            raise UserError(f"{(key + '.') if key else ''}{k}: unknown key (allowed: {', '.join(allowed)})")
    return value


def _list(key: str, value, t) -> list:
    if not isinstance(value, list) or not value:
        raise UserError(f"{key}: expected a non-empty list, got {reprlib.repr(value)}")
    return [_check(f"{key}[{i}]", v, t) for i, v in enumerate(value)]


def _setting(key: str, name: str, value):
    """value checked as the flag --name would be (settings.check_setting), the error prefixed with key."""
    if name == "context":
        if value < 1:
            raise UserError(f"{key}: context must be at least 1 (got {value})")
        return value
    try:
        return check_setting(name, value)
    except UserError as e:
        raise UserError(f"{key}: {e}") from None


def expand(path: str, base: str) -> str:
    from ..distill import corpus

    for source in corpus.SOURCES:
        if path.startswith(f"{{{source}}}/"):
            return corpus.path(source + path[len(source) + 2 :])
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.join(base, path)


def parse(raw, source: str = "") -> Experiment:
    top = {f.name: f for f in fields(Experiment) if f.name != "source"}
    if not isinstance(raw, dict):  # a list, a scalar or an empty file: say which file
        got = "an empty file" if raw is None else reprlib.repr(raw)
        raise UserError(f"{source or 'the experiment'}: expected a mapping of keys to values, got {got}")
    raw = _mapping("", raw, list(top))
    if "name" not in raw or "prompt" not in raw:
        raise UserError(f"missing required key '{'name' if 'name' not in raw else 'prompt'}'")
    kw = {"name": _check("name", raw["name"], str)}
    if not kw["name"].strip() or "/" in kw["name"] or "\0" in kw["name"] or len(kw["name"]) > 100:
        raise UserError(f"name: must be a folder name of 1 to 100 characters without '/', got "
                        f"{reprlib.repr(kw['name'])}")
    for k in ("model", "drafter", "head", "instruction", "kernels"):
        if raw.get(k) is not None:
            kw[k] = _check(k, raw[k], str)
    if kw.get("kernels", "auto") not in KERNELS:
        raise UserError(f"kernels: unknown '{kw['kernels']}' (choose from {', '.join(KERNELS)})")
    for k, t in (("chat", bool), ("ignore_eos", bool), ("max_new_tokens", int), ("temperature", float),
                 ("top_p", float), ("top_k", int), ("seed", int), ("repeats", int), ("threads", int)):
        if k in raw:
            kw[k] = _check(k, raw[k], t)
    if kw.get("repeats", 1) < 1:
        raise UserError(f"repeats: must be at least 1, got {kw['repeats']}")
    if kw.get("threads") is not None:
        check_threads(kw["threads"], "threads")
    for k in ("max_new_tokens", "temperature", "top_p", "top_k", "seed"):
        if k in kw:
            kw[k] = _setting(k, k, kw[k])
    if "modes" in raw:
        kw["modes"] = _list("modes", raw["modes"], str)
        for i, m in enumerate(kw["modes"]):
            if m not in MODES:
                raise UserError(f"modes[{i}]: unknown mode '{m}' (available: {', '.join(MODES)})")
    if "baselines" in raw:
        kw["baselines"] = _list("baselines", raw["baselines"], str)
        for i, b in enumerate(kw["baselines"]):
            if b not in BASELINES:
                raise UserError(f"baselines[{i}]: unknown baseline '{b}' (available: {', '.join(BASELINES)})")
    if "sweep" in raw:
        sweep = _mapping("sweep", raw["sweep"], list(SWEEP))
        kw["sweep"] = {k: [_setting(f"sweep.{k}[{i}]", k, x) for i, x in enumerate(_list(f"sweep.{k}", v, SWEEP[k]))]
                       for k, v in sweep.items()}
    kw["prompt"] = parse_prompt(raw["prompt"], os.path.dirname(os.path.abspath(source)) if source else os.getcwd())
    exp = Experiment(source=source, **kw)
    runs = len(exp.prompt.files or [0]) * (len(exp.modes) + len(exp.baselines)) * exp.repeats
    for values in exp.sweep.values():
        runs *= len(values)
    if runs > MAX_RUNS:
        raise UserError(f"the experiment expands to {runs:,} runs (at most {MAX_RUNS:,}); sweep fewer values")
    return exp


def parse_prompt(raw, base: str) -> Prompt:
    p = _mapping("prompt", raw, ["file", "files", "text", "tokens"])
    given = [k for k in ("file", "files", "text") if k in p]
    if len(given) != 1:
        raise UserError("prompt: give exactly one of file, files or text")
    tokens = _check("prompt.tokens", p["tokens"], int) if "tokens" in p else None
    if tokens is not None and tokens < 1:
        raise UserError(f"prompt.tokens: must be at least 1, got {tokens}")
    if "text" in p:
        return Prompt(files=[], text=_check("prompt.text", p["text"], str), tokens=tokens)
    paths = [_check("prompt.file", p["file"], str)] if "file" in p else _list("prompt.files", p["files"], str)
    paths = [expand(x, base) for x in paths]
    for x in paths:
        if not os.path.isfile(x):
            raise UserError(f"prompt: file not found: {x}")
    return Prompt(files=paths, tokens=tokens)


def load(path: str) -> Experiment:
    import yaml

    if not os.path.isfile(path):
        raise UserError(f"experiment file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', None) or e}") from None
    return parse(raw, path)
