"""--mode auto: its plan switches between rounds and the output stays exact (greedy: equal to ar; sampled: the
target's law through hundreds of switches); step costs are measured once and cached; the plan reaches --json and
the stderr summary."""
import collections
import json
import logging

import pytest
import torch
from conftest import pooled_chisquare, stdlib_text
from test_cli import run_cli
from test_hierarchy import ALPHA, random_pair, sampled_pairs

from triforce_rt import engine
from triforce_rt.engine import GenerationConfig, generate
from triforce_rt.sampling import SamplingParams
from triforce_rt.speculation.auto import PLANS, kept


def test_sampling_follows_the_target_exactly_through_switches():
    """The step costs change before every round, so Auto's plan and γ change hundreds of times, between draws and
    within them (after a one-token round, the next round drafts with other tiers: a retrieval tier rejoins the
    sequence mid-way); the first two tokens still follow the target's exact law."""
    costs = {"target": {1: 1.0, 2: 1.25, 4: 1.6}, "retrieval": 0.3, "select": 0.0}

    def change(i):
        costs["retrieval"] = [0.05, 5.0, 0.2, 5.0, 5.0][i % 5]  # retrieval cheap (self-spec), dear (ar), between
        costs["target"][4] = [1.6, 3.0][i % 2]  # a long verification cheap or dear: γ moves
    counts, law, stats, log = sampled_pairs("auto", SamplingParams(1.0), costs=costs, each_round=change)
    plans = collections.Counter(e["mode"] for e in log)
    assert plans["ar"] >= 50 and plans["self-spec"] >= 50, plans
    assert sum(e["at"] == 1 and e["mode"] != "ar" for e in log) >= 50  # drafting again after one token of ar
    assert len({e["gamma2"] for e in log if e["mode"] != "ar"}) >= 2
    assert stats[0].accepted >= 200 and stats[0].rejected >= 200, stats
    assert pooled_chisquare(counts, law) > ALPHA


def test_a_switch_mid_generation_keeps_greedy_equal_to_ar(monkeypatch):
    """Costs that promise much from the retrieval tier: auto starts with it; the tier's small budget over random
    tokens is accepted rarely, so auto drops it mid-generation. Every token equals ar's."""
    costs = {"target": {1: 1.0, 2: 1.1, 4: 1.2, 5: 1.25}, "retrieval": 0.15, "select": 0.0}
    monkeypatch.setattr(engine, "costs_for", lambda *a, **k: costs)
    target, _ = random_pair(4, vocab=64)
    prompt = torch.randint(0, 64, (120,), generator=torch.Generator().manual_seed(4)).tolist()
    cfg = dict(max_new_tokens=60, ignore_eos=True, budget=8, chunk_size=4, gamma2=4)
    res = generate(target, prompt, GenerationConfig(mode="auto", **cfg))
    assert res.tokens == generate(target, prompt, GenerationConfig(**cfg)).tokens
    modes = [e["mode"] for e in res.plan]
    assert modes[0] in ("self-spec", "self-spec-ngram") and len(modes) >= 2, res.plan
    assert 0 < res.plan[1]["at"] < 60


def test_expected_tokens_per_verification():
    assert kept(0.0, 5) == 1.0 and kept(1.0, 4) == pytest.approx(5.0, rel=0.01)
    assert kept(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert set(PLANS) == {"ar", "ngram", "self-spec", "self-spec-ngram"}


def test_step_costs_are_measured_once_then_cached(smol, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TRIFORCE_CACHE", str(tmp_path))
    ids = smol.tokenizer(stdlib_text("textwrap.py")).input_ids[:600]
    cfg = GenerationConfig(mode="auto", max_new_tokens=8, ignore_eos=True)
    with caplog.at_level(logging.INFO, logger="triforce_rt"):
        first = generate(smol, ids, cfg)
        second = generate(smol, ids, cfg)
    lines = [r.getMessage() for r in caplog.records if "step costs" in r.getMessage()]
    assert "(measured)" in lines[0] and "cached in" in lines[1], lines
    table = json.loads((tmp_path / "calibration.json").read_text())
    assert len(table) == 1 and set(next(iter(table.values()))) == {"target", "retrieval", "select"}
    ar = generate(smol, ids, GenerationConfig(max_new_tokens=8, ignore_eos=True))
    assert first.tokens == second.tokens == ar.tokens


def test_auto_is_the_default_with_its_plan_in_json_and_summary(capsys, tiny_folder):
    rc, out, err = run_cli(capsys, "generate", "--model", tiny_folder, "--prompt", "a b c a b c a b", "--verbose",
                           "--max-new-tokens", "10", "--ignore-eos", "--json")
    obj = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and obj["mode"] == "auto" and obj["plan"] and obj["plan"][0]["mode"] in PLANS
    assert [t["name"] for t in obj["tiers"]] == ["retrieval", "ngram", "target"]
    assert "[auto] step costs" in err and "| plan " in err.splitlines()[-1], err
