import os
import sys
import sysconfig
import tempfile

# One thread per process under pytest-xdist (`make test` runs two workers on two cores), two otherwise. numba's
# thread pool is sized at its import: a second, idle OpenMP thread spins between kernels and, beside the other
# worker, made both up to 8 times slower (test_smollm2_greedy_spec_modes_equal_ar 95 s against 18 s alone).
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1)
os.environ["NUMBA_NUM_THREADS"] = str(THREADS)

import numba  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from triforce_rt.models import ModelConfig  # noqa: E402
from triforce_rt.models.loader import from_state_dict  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))  # drivers

torch.set_num_threads(THREADS)
numba.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def keep_thread_count():
    """Every test ends with the thread count above: the benchmark drivers, `--threads` and an experiment's `threads`
    set it for the whole process, and one worker left at 2 beside another on 2 cores made the small-op tests after
    it up to 17 times slower (test_sampling_follows_the_target_exactly: 335 s against 20 s)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
    numba.set_num_threads(THREADS)


def child_env(**extra) -> dict:
    """The environment of a test's child process: this worker's thread count (two processes of 2 threads each on 2
    cores spin against each other: benchmarks/gpu.py --smoke took 170-234 s beside the other worker, 18 s alone)."""
    n = str(torch.get_num_threads())
    return {**os.environ, "OMP_NUM_THREADS": n, "NUMBA_NUM_THREADS": n, **extra}


def _allowed_roots() -> tuple:
    """What a test may read: Python and its packages, this checkout, temporary files, the model cache, and the
    kernel's and the system's own files. Anything else (Debian's python3.11-doc, /usr/share/common-licenses, ...)
    is a package a new machine may lack."""
    from triforce_rt.models.loader import cache_root

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, here, tempfile.gettempdir(), cache_root(),
             os.path.join(os.path.expanduser("~"), ".cache"), *sysconfig.get_paths().values(), "/proc", "/sys",
             "/dev", "/etc", "/usr/share/fonts", "/usr/local/share/fonts"}  # fonts: matplotlib's scan, optional
    return tuple(os.path.realpath(r) + os.sep for r in roots if r)


HOST_READS = []  # files outside _allowed_roots() opened by this process


def _audit(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes)):
        path = os.fsdecode(args[0])
        if os.path.isabs(path) and not (path + os.sep).startswith(ALLOWED):
            HOST_READS.append(path)


ALLOWED = _allowed_roots()
sys.addaudithook(_audit)


@pytest.fixture(autouse=True)
def reads_nothing_from_the_host():
    """Every test fails if it read a file that neither Python, `make setup` nor the test itself put there: such a test
    passes only on a machine with that file installed by hand (issue: python3.11-doc)."""
    HOST_READS.clear()
    yield
    found = sorted(set(HOST_READS))
    assert not found, f"read from outside the project's installs: {found[:5]}"


def stdlib_text(name: str) -> str:
    """A Python standard library source from the shipped corpus (the same on every machine)."""
    from triforce_rt.distill.corpus import read

    return read("stdlib", f"stdlib/{name}")


def pooled_chisquare(counts: torch.Tensor, law: torch.Tensor) -> float:
    """Chi-square p-value of observed counts against exact probabilities `law`. A draw where the law is 0 gives
    0.0; cells expected below 5 (where the test's approximation fails) are pooled into one."""
    from scipy.stats import chisquare

    counts, law = counts.double(), law.double() / law.double().sum()
    if counts[law == 0].sum() > 0:
        return 0.0
    counts, law = counts[law > 0], law[law > 0]
    n = counts.sum()
    keep = law * n >= 5
    f_obs = torch.cat([counts[keep], counts[~keep].sum()[None]]) if (~keep).any() else counts
    f_exp = (torch.cat([law[keep], law[~keep].sum()[None]]) if (~keep).any() else law) * n
    return float(chisquare(f_obs.numpy(), f_exp.numpy()).pvalue)


def hf_model(kind="llama", seed=0, **kw):
    """A tiny random transformers model (fp32, eval) of the given family."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                          "mistral": (MistralConfig, MistralForCausalLM)}[kind]
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
    base.update(kw)
    torch.manual_seed(seed)
    m = model_cls(cfg_cls(**base)).float().eval()
    with torch.no_grad():  # random biases and norms, so those paths are really compared
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def ours(hf):
    """Our Transformer holding (a copy of) the weights of a transformers model."""
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    return from_state_dict(ModelConfig.from_hf(hf.config), sd).eval().setup_rope()


@pytest.fixture(scope="session")
def smol():
    """SmolLM2-135M-Instruct, loaded once for the whole session."""
    from triforce_rt import load_model

    return load_model("default")


@pytest.fixture(scope="session")
def smol_hf(smol):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(smol.source, dtype=torch.float32).eval()


def tiny_with_smol_tokenizer(tmp_path_factory, smol, context: int) -> str:
    """A tiny random Llama saved as an HF folder (safetensors) with SmolLM2's tokenizer and the given context."""
    d = tmp_path_factory.mktemp(f"tiny-llama-{context}")
    m = hf_model(vocab_size=smol.config.vocab_size, max_position_embeddings=context, tie_word_embeddings=True,
                 bos_token_id=1, eos_token_id=2)
    m.save_pretrained(d)
    smol.tokenizer.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, smol):
    """tiny_with_smol_tokenizer, context 64."""
    return tiny_with_smol_tokenizer(tmp_path_factory, smol, 64)


@pytest.fixture(scope="session")
def tiny_drafter(tiny_folder):
    """The tiny random Llama of tiny_folder as a drafter for SmolLM2 (same vocabulary)."""
    from triforce_rt import load_model

    return load_model(tiny_folder)

