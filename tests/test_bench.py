"""The benchmark drivers on a tiny random target and real held-out text: every mode's output equals ar's, and the
reports render (the numbers themselves are for benchmarks/, on SmolLM2)."""
import torch
from conftest import tiny_with_smol_tokenizer
from test_hierarchy import random_head

from drivers import drafters_markdown, refresh_markdown, run_drafters, run_refresh
from triforce_rt import load_model


def test_drafters_and_refresh_benchmarks_run_and_match_ar(tmp_path_factory, smol, tiny_folder):
    target = tiny_with_smol_tokenizer(tmp_path_factory, smol, 512)
    # threads: the drivers set the process's thread count, and a worker left at 2 beside another on 2 cores makes
    # the small-op tests after it many times slower
    kw = dict(spec=target, contexts=(160, 320), docs=2, new_tokens=12, prompts=("explain",),
              threads=torch.get_num_threads())
    head = str(tmp_path_factory.mktemp("head"))
    random_head(load_model(target)).save(head, {})
    report = run_drafters({"a": tiny_folder, "h": head}, out=str(tmp_path_factory.mktemp("b") / "d.json"),
                          gammas=(None, 3), beams=(1, 3), cutoffs=(None, 0.0), quants=("q4",), baselines=("ngram",),
                          **kw)
    rows = report["rows"]
    # documents x contexts x (gammas x (2 drafter modes, 2 cutoffs x (redrafter W 1 and 3, triforce-redrafter,
    # redrafter-ngram), self-spec on a q4 copy) + ngram)
    assert len(rows) == 2 * 2 * (2 * (2 + 2 * 4 + 1) + 1)
    assert sum("tree" in r for r in rows) == 2 * 2 * 2 * 2  # redrafter with 3 beams
    assert all(r["tokens_identical"] for r in rows)
    assert {r["mode"] for r in rows} == {"draft", "triforce", "redrafter", "triforce-redrafter", "redrafter-ngram",
                                         "self-spec", "ngram"}
    assert {r["cutoff"] for r in rows if r["drafter"] == "h"} == {"default", 0.0}
    kinds = {"h": "head", "a": "drafter", "self-spec-q4": "retrieval", "none": "ngram"}
    assert all(r["tiers"][0]["name"] == kinds[r["drafter"]] for r in rows)
    assert all(r["tiers"][0]["calls"] > 0 for r in rows if r["mode"] != "redrafter-ngram")  # the lookup may match
    text = drafters_markdown(report)
    assert "| 320 | triforce | a | default | 1 |  |" in text
    assert "| 320 | triforce-redrafter | h | 3 | 1 | 0.0 |" in text
    assert "| 320 | redrafter | h | 3 | 3 | default |" in text and "| 320 | ngram | none | default | 1 |  |" in text
    assert "| 320 | redrafter" in text.split("Best mode with the head")[1]
    assert "2 documents" in text
    report = run_refresh(drafter=tiny_folder, **kw)
    assert len(report["rows"]) == 2 * 2 * 3 * 2 and all(r["tokens_identical"] for r in report["rows"])
    assert "| 160 | triforce-ngram | 1 |" in refresh_markdown(report)


def test_auto_benchmark_variants_run_with_its_drafter(tmp_path_factory, smol, tiny_folder):
    """benchmarks/auto.py's every greedy variant (fixed modes, auto, the q4 drafting copy) runs with the tiny drafter
    it passes, and equals ar (the head's modes, which need a head, are drafters.py's)."""
    from auto import variants

    from triforce_rt.engine import GenerationConfig, generate

    target = load_model(tiny_with_smol_tokenizer(tmp_path_factory, smol, 512))
    drafter = load_model(tiny_folder)
    ids = list(range(1, 200))
    ar = generate(target, ids, GenerationConfig(max_new_tokens=8, ignore_eos=True)).tokens
    for label, settings in variants("q4", greedy=True):
        res = generate(target, ids, GenerationConfig(max_new_tokens=8, ignore_eos=True, **settings), drafter=drafter)
        assert res.tokens == ar, label
