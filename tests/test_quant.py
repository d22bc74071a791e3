"""--draft-quant: the self-drafting tiers run on a Q8_0 / Q4_0 copy of the target (the target verifies with its own
weights, so the tokens do not change); what it quantizes, what it refuses, and that it stays resident beside
streamed weights."""
import pytest
import torch
from conftest import pooled_chisquare, stdlib_text
from test_cli import run_cli
from test_hierarchy import ALPHA, sampled_pairs

from cpu_kernels import Blocks
from triforce_rt import load_model
from triforce_rt.engine import GenerationConfig, generate
from triforce_rt.errors import UserError
from triforce_rt.models.quant import quantized
from triforce_rt.sampling import SamplingParams
from triforce_rt.settings import check_config


@pytest.mark.parametrize("fmt,step", [("Q8_0", 1 / 127), ("Q4_0", 1 / 8)])
def test_quantize_error_is_within_a_step(fmt, step):
    """|w - dequantize(quantize(w))| <= one quantization step of its block (amax x step; Q4_0 rounds to half a
    step except at the clipped end), fp16 rounding of the scale aside."""
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    b = Blocks.quantize(w, fmt)
    amax = w.view(16, 8, 32).abs().amax(-1, keepdim=True)
    err = (b.dequantize() - w).view(16, 8, 32).abs()
    assert (err <= amax * step * 1.01).all()
    assert b.nbytes < w.numel() * 4 * (0.3 if fmt == "Q8_0" else 0.17)


def test_default_model_q4_copy_is_smaller_and_separate(smol):
    copy = quantized(smol, "q4")
    assert copy is quantized(smol, "q4")  # made once
    assert {b.fmt for b in copy.weight_blocks} == {"Q4_0"}
    assert copy.weight_bytes() < 0.8 * smol.weight_bytes()
    ours = {t.untyped_storage().data_ptr() for t in smol.parameters()}
    assert not ours & {t.untyped_storage().data_ptr() for t in copy.parameters()}
    with pytest.raises(UserError, match=r"a Q8_0 copy \(1\d\d MB\) would not be smaller than the target's Q4_1/Q8_0"):
        quantized(smol, "q8")


def test_quantized_tier_keeps_smollm2_greedy_equal_to_ar(smol):
    ids = smol.tokenizer(stdlib_text("textwrap.py")).input_ids[:1200]
    base = dict(max_new_tokens=32, ignore_eos=True, budget=256)
    ar = generate(smol, ids, GenerationConfig(**base)).tokens
    for mode in ("self-spec", "auto"):
        res = generate(smol, ids, GenerationConfig(mode=mode, draft_quant="q4", **base))
        assert res.tokens == ar, mode
    retrieval = res.tiers[0]
    assert retrieval["name"] == "retrieval"


@pytest.mark.parametrize("mode,quant", [("self-spec", "q4"), ("triforce", "q8")])
def test_sampling_through_a_quantized_tier_follows_the_target_exactly(mode, quant):
    """The retrieval tier drafts from a Q4_0 / Q8_0 copy of the tiny target (its q differs from the target's p more
    than its own weights' would); the first two tokens still follow the target's law."""
    counts, law, stats, _ = sampled_pairs(mode, SamplingParams(1.0), draft_quant=quant)
    retrieval = stats[-1]
    assert retrieval.name == "retrieval" and retrieval.accepted >= 200 and retrieval.rejected >= 200, stats
    assert pooled_chisquare(counts, law) > ALPHA


def test_quantized_copy_stays_resident_beside_streamed_weights():
    """--offload weights (its CPU path): the fp32 target streams its layers through two buffers; the q8 copy is
    made from the host copy of the weights (not whatever layer the buffers hold) and gives the resident tokens."""
    ids = list(range(100, 700))
    cfg = GenerationConfig(mode="self-spec", draft_quant="q8", max_new_tokens=16, ignore_eos=True, budget=128)
    resident = load_model("default", kernels="torch")
    streamed = load_model("default", kernels="torch", offload="weights", resident_layers=4)
    assert streamed.runtime.weight_stream.streamed == 26
    want = generate(resident, ids, cfg)
    got = generate(streamed, ids, cfg)
    assert got.tokens == want.tokens and got.tiers[0]["accepted"] == want.tiers[0]["accepted"]
    copy = quantized(streamed, "q8")
    for a, b in zip(copy.weight_blocks, quantized(resident, "q8").weight_blocks):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


@pytest.mark.parametrize("cfg,needle", [
    (dict(mode="ar", draft_quant="q8"), "mode 'ar' has no tier that drafts with the target's weights"),
    (dict(mode="ngram", draft_quant="q4"), "mode 'ngram' has no tier"),
    (dict(mode="self-spec", draft_quant="q4", draft_dtype="bfloat16"), "exclude each other"),
    (dict(mode="self-spec", draft_quant="int2"), "unknown draft_quant 'int2'"),
])
def test_impossible_draft_quant_is_one_line(cfg, needle):
    with pytest.raises(UserError, match=needle):
        check_config(GenerationConfig(**cfg))


def test_cli_draft_quant_errors_exit_2(capsys, smol):
    for argv, needle in ((["--mode", "ar", "--draft-quant", "q8"], "no tier that drafts"),
                         (["--mode", "self-spec", "--draft-quant", "q8"], "would not be smaller")):
        rc, out, err = run_cli(capsys, "generate", "--prompt", "hello there", "--max-new-tokens", "2", *argv)
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
