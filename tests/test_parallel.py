"""Tensor parallel: real torch.distributed (gloo) under torchrun, two processes, against one process on SmolLM2."""
import json
import subprocess
import sys

import pytest
from conftest import stdlib_text

from triforce_rt.engine import GenerationConfig, generate
from triforce_rt.models.loader import default_drafter
from triforce_rt.parallel import split


def test_split_covers_every_item_once():
    for n in range(1, 12):
        for world in range(1, n + 1):
            parts = [split(n, world, r) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1


@pytest.mark.parametrize("mode", ["ar", "triforce", "auto", "redrafter"])
def test_tp2_gloo_equals_one_process(smol, tmp_path, mode):
    """SmolLM2's 3 kv heads split 2 + 1, its MLP 768 + 768; triforce adds the retrieval tier (sharded target
    weights, per-rank chunk selection over local heads) and the shipped drafter (whole on each rank); auto's ranks
    share rank 0's step costs (cached or measured), so they choose the same plans; redrafter runs the shipped head
    (whole on each rank) with trees of 3 beams (tree steps over each rank's heads)."""
    ids = smol.tokenizer(stdlib_text("textwrap.py")).input_ids[:900]
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(smol.tokenizer.decode(ids))
    ids = smol.tokenizer(prompt.read_text()).input_ids
    cfg = dict(max_new_tokens=24, ignore_eos=True, mode=mode, budget=256)
    drafter, extra = None, []
    if mode == "triforce":
        from triforce_rt import load_model

        drafter = load_model(default_drafter())
    if mode == "redrafter":
        from triforce_rt.models.head import load_head

        drafter, extra = load_head(default_drafter(head=True), smol), ["--beams", "3"]
        cfg["beams"] = 3
    want = generate(smol, ids, GenerationConfig(**cfg), drafter=drafter).tokens
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "triforce_rt", "generate", "--tp", "2", "--prompt-file", str(prompt), "--json", "--threads", "1",
           "--max-new-tokens", "24", "--ignore-eos", "--mode", mode, "--budget", "256", *extra]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 alone prints
    assert json.loads(lines[0])["tokens"] == want


def test_tp_outside_torchrun_is_a_clear_error(capsys):
    from triforce_rt.cli import main

    assert main(["generate", "--prompt", "hi", "--tp", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "torchrun --nproc-per-node 2" in err
