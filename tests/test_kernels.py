"""The numba CPU kernels (cpu_kernels): the exact dequantized values, sums within the fp32 error bound of torch's,
the default model read from its GGUF blocks equal to the converted fp32 folder, every mode token-identical to
`ar` on those kernels, and one-line errors for what they cannot run."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import child_env, hf_model, ours
from gguf import GGMLQuantizationType, GGUFWriter, dequantize, quantize
from test_hierarchy import (ALPHA, SPEC_MODES, mode_config, random_head, random_pair, sampled_pairs, sweep_cases,
                            with_head)

from cpu_kernels import FORMATS, Blocks, attention_in, attention_out, linear, pack
from triforce_rt import GenerationConfig, generate, load_model
from triforce_rt.errors import UserError
from triforce_rt.models.kernels import choose, place_blocks, read_gguf, use_numba
from triforce_rt.models.loader import default_gguf, resolve
from triforce_rt.sampling import SamplingParams
from conftest import pooled_chisquare


@pytest.mark.parametrize("fmt", FORMATS)
def test_blocks_dequantize_to_gguf_values(fmt):
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(0))
    raw = quantize(w.numpy(), GGMLQuantizationType[fmt])
    b = Blocks.from_gguf(fmt, raw, 96)
    ref = torch.from_numpy(dequantize(raw, GGMLQuantizationType[fmt]))
    assert torch.equal(b.dequantize(), ref)
    ids = torch.tensor([[5, 0], [23, 5]])
    assert torch.equal(b.dequantize(ids), ref[ids])  # the embedding lookup


@pytest.mark.parametrize("fmt", FORMATS + ("fp32",))
def test_one_hot_rows_give_the_exact_weights(fmt):
    """x = identity: each output is one weight times 1 plus zeros, so any rounding in the kernel's weight values
    (an FMA in d * q + m, say) would show."""
    w = torch.randn(36, 64, generator=torch.Generator().manual_seed(1))
    b = w if fmt == "fp32" else Blocks.quantize(w, fmt)
    ref = w if fmt == "fp32" else b.dequantize()
    for M in (1, 4, 6):  # single rows, whole tiles of 4, a padded tile
        assert torch.equal(linear(torch.eye(64)[:M], b), ref.T[:M])
    assert torch.equal(linear(torch.eye(64), b), ref.T)  # 64 rows: torch's path


@pytest.mark.parametrize("fmt", FORMATS + ("fp32",))
def test_sums_within_the_fp32_error_bound(fmt):
    """|kernel - exact| <= γ_K · |x| |W|ᵀ, the forward error bound of any fp32 summation order of K products
    (γ_K = K u / (1 - K u), u = 2^-24); torch's F.linear meets the same bound. Shapes: rows not a multiple of 4,
    every count of rows the kernel tiles differently."""
    g = torch.Generator().manual_seed(2)
    for N, K in ((1, 32), (7, 96), (64, 576)):
        w = torch.randn(N, K, generator=g)
        b = w if fmt == "fp32" else Blocks.quantize(w, fmt)
        wd = w if fmt == "fp32" else b.dequantize()
        u = 2.0 ** -24
        for M in (1, 2, 3, 4, 5, 7, 8, 16, 33):
            x = torch.randn(M, K, generator=g)
            exact = x.double() @ wd.double().T
            bound = K * u / (1 - K * u) * (x.double().abs() @ wd.double().abs().T)
            for out in (linear(x, b), F.linear(x, wd)):
                assert out.shape == (M, N)
                assert ((out.double() - exact).abs() <= bound).all(), (N, K, M)


@pytest.mark.parametrize("fmt", FORMATS + ("fp32",))
def test_rows_are_independent_of_the_batch(fmt):
    """Row r of a step's output does not depend on the other rows nor on how many there are: every output is summed
    in one order whatever chunk it falls in (1, 2, 4, 6 or 8 rows, padded ones, overlapping chunks of 8 past 8 rows),
    so ar, a verify step and a batch see the same logits for the same hidden state, bit for bit."""
    w = torch.randn(40, 128, generator=torch.Generator().manual_seed(3))
    w = w if fmt == "fp32" else Blocks.quantize(w, fmt)
    x = torch.randn(19, 128, generator=torch.Generator().manual_seed(4))
    full = linear(x, w)
    for M in range(1, 20):
        for r in range(19 - M + 1):
            assert torch.equal(linear(x[r:r + M], w), full[r:r + M]), (M, r)


def block_maps(fmt, D=64, Dq=96, Dkv=32, I=128, seed=5):
    """A block's seven maps (q, k, v, o, gate, up, down) as cpu_kernels.attention_in/out take them, in fmt, with
    biases on q, k, v and o (Qwen2's and attention_bias's)."""
    g = torch.Generator().manual_seed(seed)
    shapes = ((Dq, D), (Dkv, D), (Dkv, D), (D, Dq), (I, D), (I, D), (D, I))
    maps = []
    for i, (n, k) in enumerate(shapes):
        w = torch.randn(n, k, generator=g) / k ** 0.5
        b = w if fmt == "fp32" else Blocks.quantize(w, fmt)
        bias = torch.randn(n, generator=g).numpy() if i < 4 else None
        maps.append((*pack(b), bias, n))
    return maps


@pytest.mark.parametrize("fmt", ["Q4_1", "fp32"])
def test_fused_block_rows_are_independent_of_the_batch(fmt):
    """attention_in and attention_out (a block's work around attention in two calls) give row r the same bits
    whatever the other rows and their count: ar, verify steps and batches see the same block outputs. A format
    enters only through the kernel's chunks (row-independent in every format: test_rows_are_independent_of_the_batch);
    Q4_1 runs a lone row as 1 row, fp32 as 2 (chunk_rows), as Q4_0 and Q8_0 do."""
    q, k, v, o, gate, up, down = block_maps(fmt)
    g = torch.Generator().manual_seed(6)
    x, a = torch.randn(19, 64, generator=g).numpy(), torch.randn(19, 96, generator=g).numpy()
    norm, eps = torch.rand(64, generator=g).numpy() + 0.5, np.float32(1e-5)
    before = attention_in(x, norm, eps, q, k, v)
    after = attention_out(x, a, o, norm, eps, gate, up, down)
    for M in range(1, 20):
        for r in range(19 - M + 1):
            rows = slice(r, r + M)
            got = attention_in(np.ascontiguousarray(x[rows]), norm, eps, q, k, v)
            assert all(np.array_equal(t, ref[rows]) for t, ref in zip(got, before)), (M, r)
            got = attention_out(np.ascontiguousarray(x[rows]), np.ascontiguousarray(a[rows]), o, norm, eps, gate,
                                up, down)
            assert np.array_equal(got, after[rows]), (M, r)


def test_fused_rms_norm_within_its_fp32_error_bound():
    """attention_in with identity maps gives rms_norm(x) itself (one-hot rows add exact zeros). Its error against
    float64 is within the first-order bound of its operations: a K-term sum of squares (γ_K, halved by the square
    root) and six roundings (mean, + eps, sqrt, 1 / r, x r, w (x r)), so |out - exact| <= γ_(K/2 + 6) |exact|;
    torch's F.rms_norm meets the same bound."""
    K, u = 576, 2.0 ** -24
    eye = (*pack(torch.eye(K)), None, K)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(9, K, generator=g) * torch.logspace(-3, 3, 9)[:, None]  # rows of every scale
    w, eps = torch.rand(K, generator=g) + 0.5, 1e-5
    exact = w.double() * x.double() / (x.double().pow(2).mean(-1, keepdim=True) + eps).sqrt()
    n = K / 2 + 6
    bound = n * u / (1 - n * u) * exact.abs()
    got = torch.from_numpy(attention_in(x.numpy(), w.numpy(), np.float32(eps), eye, eye, eye)[0])
    for out in (got, w * F.rms_norm(x, (K,), eps=eps)):
        assert ((out.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("first", ["retrieval_cache", "cpu_kernels", "triforce_rt"])
def test_numba_targets_512_bit_vectors_whichever_package_comes_first(first):
    """On an AVX-512 CPU, numba compiles every kernel with 512-bit vectors whichever of the project's packages a
    program imports first (numba fixes its target at the first jitted function; with 256 bits the kernels ran up to
    2.6x slower). The child process starts without the setting this process has."""
    from llvmlite import binding

    if not binding.get_host_cpu_features().get("avx512f"):
        pytest.skip("this CPU has no AVX-512: numba's default target is the one used")
    env = {k: v for k, v in child_env().items() if k != "NUMBA_CPU_FEATURES"}
    code = (f"import {first}, numba\nfrom numba.core.registry import cpu_target\n"
            "print(cpu_target.target_context.codegen().magic_tuple()[2])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "-prefer-256-bit" in out.strip().split(",")


def test_default_model_blocks_equal_the_converted_folder():
    """Every tensor read_gguf gives for the default model, dequantized, is bit for bit the tensor transformers'
    conversion wrote (names and row order included: q and k rows are un-permuted as blocks)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    folder = resolve("default")
    got = read_gguf(default_gguf(), AutoConfig.from_pretrained(folder))
    kinds = {type(v).__name__ for v in got.values()}
    assert kinds == {"Blocks", "Tensor"}
    with safe_open(f"{folder}/model.safetensors", "pt") as f:
        assert set(f.keys()) == set(got)
        for name, v in got.items():
            assert torch.equal(v.dequantize() if isinstance(v, Blocks) else v, f.get_tensor(name)), name


def test_default_model_runs_from_its_blocks(smol):
    assert smol.runtime.kernels == "numba" and smol.weight_blocks  # auto, on the CPU in fp32
    assert isinstance(smol.head, Blocks) and smol.head.fmt == "Q8_0"
    assert smol.layers[0].mlp.up_proj.blocks.fmt == "Q4_1"
    assert sum(b.nbytes for b in smol.weight_blocks) < 120e6  # 111 MB, against 538 MB of fp32 weights
    with pytest.raises(UserError, match="no copy in another dtype"):
        smol.with_dtype(torch.bfloat16)


def test_numba_and_torch_kernels_decode_the_same_tokens(smol):
    torch_model = load_model("default", kernels="torch")
    assert torch_model.runtime.kernels == "torch" and not torch_model.weight_blocks
    from conftest import stdlib_text

    ids = smol.tokenizer(stdlib_text("textwrap.py")).input_ids[:300]
    cfg = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    assert generate(smol, ids, cfg).tokens == generate(torch_model, ids, cfg).tokens


def numba_pair(seed, n_kv, blocks: bool):
    """random_pair on the numba kernels; blocks: the target's matrices quantized to Q4_1 (head Q8_0) first."""
    target, drafter = random_pair(seed, n_kv)
    if blocks:
        sd = target.state_dict()
        q = {k: Blocks.quantize(v, "Q8_0" if k == "lm_head.weight" else "Q4_1") for k, v in sd.items()
             if v.dim() == 2 and "embed" not in k}
        place_blocks(target, q)
    use_numba(target), use_numba(drafter)
    return target, drafter


@pytest.mark.parametrize("blocks", [False, True], ids=["fp32", "Q4_1"])
@pytest.mark.parametrize("case", list(sweep_cases(6)), ids=lambda c: f"seed{c['seed']}-kv{c['n_kv']}")
def test_greedy_every_mode_equals_ar_on_numba(case, blocks):
    target, drafter = numba_pair(case["seed"], case["n_kv"], blocks)
    prompt = torch.randint(0, 64, (case["prompt_len"],), generator=torch.Generator().manual_seed(case["seed"])).tolist()
    cfg = dict(max_new_tokens=32, ignore_eos=True, **{**case["cfg"], "draft_dtype": None})
    cfg["budget"] = max(cfg["budget"], cfg["chunk_size"])
    if blocks and cfg["draft_quant"] == "q8":  # Q8_0 is no smaller than the target's Q4_1: refused
        cfg["draft_quant"] = "q4"
    ar = generate(target, prompt, mode_config("ar", **cfg)).tokens
    drafter = with_head(target, drafter, case["seed"])
    for mode in SPEC_MODES:
        assert generate(target, prompt, mode_config(mode, **cfg), drafter=drafter).tokens == ar, mode


def test_recurrent_head_runs_on_its_numba_targets_kernels():
    """RecurrentHead.on_kernels_of (load_head): a numba target's head runs its five maps on cpu_kernels.Linear over
    Q8_0 blocks of its weights, with the values of a torch head over those blocks' dequantized weights up to fp32
    summation order; a torch target's head is unchanged."""
    import copy

    maps = ("W", "U", "fc1", "fc2", "out")
    torch_target, numba_target = random_pair(0)[0], numba_pair(0, 2, blocks=True)[0]
    head = random_head(torch_target, seed=1)
    assert all(type(getattr(head, m)) is torch.nn.Linear for m in maps)
    numba_head, torch_head = copy.deepcopy(head).on_kernels_of(numba_target), copy.deepcopy(head)
    assert all(getattr(numba_head, m).blocks.fmt == "Q8_0" for m in maps)
    with torch.no_grad():
        for m in maps:
            w = getattr(torch_head, m).weight
            w.copy_(Blocks.quantize(w, "Q8_0").dequantize())
    g = torch.Generator().manual_seed(0)
    for rows in (1, 3, 8):  # a chain's step, and beam search steps of 3 and 8 beams
        e, h = torch.randn(2, rows, 32, generator=g), torch.randn(rows, 32, generator=g)
        with torch.inference_mode():
            s = [hd.step(e[1], hd.step(e[0], None)) for hd in (torch_head, numba_head)]  # U's map too
            torch.testing.assert_close(s[1], s[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(numba_head.reduced_logits(s[1], h), torch_head.reduced_logits(s[0], h),
                                       rtol=1e-5, atol=1e-5)


def test_rows_not_whole_blocks_stay_on_torch():
    """hidden 48: no matrix has whole 32-value rows but the MLP's down map (96), which alone goes to numba."""
    hf = hf_model(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
    torch_model, numba_model = ours(hf), ours(hf)
    use_numba(numba_model)
    assert numba_model.runtime.head is None
    assert type(numba_model.layers[0].mlp.down_proj).__module__ == "cpu_kernels.modules"
    assert type(numba_model.layers[0].mlp.up_proj).__module__ == "torch.nn.modules.linear"
    cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    prompt = list(range(3, 20))
    assert generate(numba_model, prompt, cfg).tokens == generate(torch_model, prompt, cfg).tokens


def test_sampling_follows_the_target_exactly_on_numba():
    """8 rows a step, so every tier's steps (at most 8 x 4 rows) stay on the numba kernels."""
    counts, law, stats, _ = sampled_pairs("triforce", SamplingParams(1.0), rows=8, kernels=use_numba)
    assert all(s.accepted >= 200 and s.rejected >= 200 for s in stats), stats
    assert pooled_chisquare(counts, law) > ALPHA


def tiny_gguf(path, kind: GGMLQuantizationType):
    """A GGUF file holding one [64, 256] matrix of the given type (zero bytes): enough for the header check."""
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[kind]
    w = GGUFWriter(str(path), "llama")
    raw = np.zeros((64, 256 // block * size), np.uint8)
    w.add_tensor("blk.0.ffn_up.weight", raw, raw_shape=raw.shape, raw_dtype=kind)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()


def test_what_the_kernels_cannot_run_is_one_line(tmp_path):
    cpu, f32 = torch.device("cpu"), torch.float32
    q6 = tmp_path / "q6.gguf"
    tiny_gguf(q6, GGMLQuantizationType.Q6_K)
    cases = [(("numba", torch.device("cuda"), f32, None), "run on the CPU"),
             (("numba", cpu, torch.bfloat16, None), "compute in float32"),
             (("numba", cpu, f32, None, 2), "--tp"),
             (("numba", cpu, f32, str(q6)), "read Q4_0, Q4_1, Q8_0 blocks and F32/F16/BF16 tensors, not Q6_K"),
             (("fast", cpu, f32, None), "unknown --kernels 'fast'")]
    for args, msg in cases:
        with pytest.raises(UserError, match=msg):
            choose(*args)
    assert choose("auto", cpu, f32, str(q6)) == "torch"  # auto falls back where numba cannot run
    assert choose("auto", cpu, f32, None) == "torch"  # fp32 folders: torch (benchmarks/results/kernels-cpu.md)
    assert choose("auto", cpu, f32, default_gguf()) == "numba"
    assert choose("auto", cpu, torch.bfloat16, default_gguf()) == "torch"


def test_cli_kernels_errors_exit_2(tmp_path):
    import subprocess
    import sys

    q4k = tmp_path / "q4k.gguf"
    tiny_gguf(q4k, GGMLQuantizationType.Q4_K)
    for args, msg in ((["--model", str(q4k), "--kernels", "numba"], "not Q4_K"),
                      (["--kernels", "numba", "--dtype", "bfloat16"], "compute in float32"),
                      (["--kernels", "gemm"], "invalid choice")):
        p = subprocess.run([sys.executable, "-m", "triforce_rt", "generate", "--prompt", "hi", *args],
                           capture_output=True, text=True, env=child_env())
        assert p.returncode == 2 and msg in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
