"""`triforce distill` end to end on a tiny target: deterministic, cached teacher pass, and a drafter that
load_model and --drafter accept, whose greedy drafts keep the output identical to ar."""
import os
import re

import pytest
import torch
from conftest import stdlib_text
from safetensors.torch import load_file

from triforce_rt import load_model
from triforce_rt.distill import DistillConfig, distill
from triforce_rt.engine import GenerationConfig, generate
from triforce_rt.settings import HEAD_MODES


def tiny_cfg(target, out, **kw):
    base = dict(target=target, layers=1, hidden=32, tokens=640, seq_len=32, sinks=4, vocab=300, epochs=2, batch=4,
                top_k=4, new_tokens=8, out=str(out))
    return DistillConfig(**{**base, **kw})


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Teacher data goes to a test's own cache, never to the user's ~/.cache/triforce-rt."""
    monkeypatch.setenv("TRIFORCE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def two_runs(tiny_folder, tmp_path_factory):
    """The same distillation twice, each with an empty teacher cache, then a third time reusing the cache."""
    root = tmp_path_factory.mktemp("distill")
    outs = []
    old = os.environ.get("TRIFORCE_CACHE")
    try:
        for i in range(2):
            os.environ["TRIFORCE_CACHE"] = str(root / f"cache{i}")
            metrics = distill(tiny_cfg(tiny_folder, root / f"out{i}"), progress=False)
            outs.append((root / f"out{i}", metrics))
    finally:
        if old is None:
            os.environ.pop("TRIFORCE_CACHE", None)
        else:
            os.environ["TRIFORCE_CACHE"] = old
    return root, outs


def test_distill_is_deterministic(two_runs):
    _, [(a, ma), (b, mb)] = two_runs
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ma["agreement"] == mb["agreement"] and ma["positions"] > 0
    assert ma["train_loss_last"] < ma["train_loss_first"]  # it learns


def test_teacher_pass_is_cached(two_runs, tiny_folder, monkeypatch):
    root, _ = two_runs
    monkeypatch.setenv("TRIFORCE_CACHE", str(root / "cache0"))
    import triforce_rt.distill as d

    monkeypatch.setattr(d, "label", lambda *a, **k: pytest.fail("the teacher ran again"))
    distill(tiny_cfg(tiny_folder, root / "out-again", epochs=0.5), progress=False)


def test_agreement_benchmark_reads_the_cached_teacher_data(two_runs, tiny_folder, monkeypatch):
    """benchmarks/agreement.py's driver scores a drafter on distill's held-out part and a training sample, from the
    teacher cache (the teacher never runs again)."""
    import triforce_rt.distill as d
    from drivers import agreement_markdown, run_agreement

    root, [(out, metrics), _] = two_runs
    monkeypatch.setenv("TRIFORCE_CACHE", str(root / "cache0"))
    monkeypatch.setattr(d, "label", lambda *a, **k: pytest.fail("the teacher ran again"))
    report = run_agreement({"a": str(out)}, spec=tiny_folder, cfg=tiny_cfg(tiny_folder, root / "unused"),
                           threads=torch.get_num_threads())  # keep the worker's thread count (test_bench.py)
    [row] = report["rows"]
    assert row["positions"] == metrics["positions"] and report["records"] == 16  # max(16, 20 // 20) held-out records
    assert 0 <= row["heldout"] <= 1 and 0 <= row["train_sample"] <= 1
    assert "| a |" in agreement_markdown(report)


def test_distilled_drafter_loads_and_keeps_greedy_exact(two_runs, tiny_folder):
    _, [(out, _), _] = two_runs
    drafter = load_model(str(out))
    target = load_model(tiny_folder)
    assert drafter.config.draft_vocab > 0 and drafter.config.vocab_size == target.config.vocab_size
    ids = target.tokenizer(stdlib_text("textwrap.py")).input_ids[:24]
    cfg = dict(max_new_tokens=24, ignore_eos=True, sinks=4, window=20)
    ar = generate(target, ids, GenerationConfig(**cfg))
    for mode in ("draft", "triforce", "triforce-ngram"):
        res = generate(target, ids, GenerationConfig(mode=mode, budget=8, **cfg), drafter=drafter)
        assert res.tokens == ar.tokens, mode


def test_distill_continues_from_a_drafter_on_longer_records(two_runs, tiny_folder):
    """--init: training goes on from a drafter's weights and draft vocabulary with a longer --seq-len; the result's
    context is the new length, and generation gives it the matching StreamingCache window by default."""
    root, [(first, _), _] = two_runs
    out = root / "continued"
    cfg = tiny_cfg(tiny_folder, out, seq_len=48, tokens=480, epochs=1, init=str(first), layers=3, hidden=64)
    distill(cfg, progress=False)
    a, b = load_model(str(first)), load_model(str(out))
    assert b.config.max_position_embeddings == 48 and a.config.max_position_embeddings == 32
    assert b.config.num_hidden_layers == a.config.num_hidden_layers  # the shape comes from --init
    assert torch.equal(a.vocab_ids, b.vocab_ids)
    assert not torch.equal(a.layers[0].self_attn.q_proj.weight, b.layers[0].self_attn.q_proj.weight)
    target = load_model(tiny_folder)
    ids = target.tokenizer(stdlib_text("textwrap.py")).input_ids[:40]
    ar = generate(target, ids, GenerationConfig(max_new_tokens=16, ignore_eos=True, sinks=4))
    res = generate(target, ids, GenerationConfig(max_new_tokens=16, ignore_eos=True, sinks=4, mode="draft"), drafter=b)
    assert res.tokens == ar.tokens


def test_distill_init_must_be_a_distilled_drafter(tiny_folder, tmp_path):
    from triforce_rt.errors import UserError

    with pytest.raises(UserError, match="not a reduced-vocabulary drafter"):
        distill(tiny_cfg(tiny_folder, tmp_path / "d", init=tiny_folder), progress=False)


def test_student_starts_from_the_listed_target_layers(tiny_folder):
    """At the target's width the student's layers are copies of the listed target layers, with the target's
    attention and MLP shapes (the tiny target has 2 KV heads; a student of its own shape would have 1)."""
    from triforce_rt.distill.train import copied_layers, init_student, student_config

    target = load_model(tiny_folder)
    tc = target.config
    picked = copied_layers("1,0,1", 2, tc.hidden_size, tc.num_hidden_layers, tc.hidden_size)
    assert picked == [1, 0, 1]
    vocab_ids = torch.arange(0, tc.vocab_size, 2)
    student = init_student(target, student_config(tc, 3, tc.hidden_size, len(vocab_ids), 32, copied=True),
                           vocab_ids, 0, picked)
    for mine, theirs in zip(student.layers, picked):
        for (name, a), b in zip(mine.state_dict().items(), target.layers[theirs].state_dict().values()):
            assert torch.equal(a, b), name
    own = student_config(tc, 3, tc.hidden_size, len(vocab_ids), 32, copied=False)
    assert own.num_key_value_heads != tc.num_key_value_heads == student.config.num_key_value_heads
    assert copied_layers("first", 2, tc.hidden_size, 2, tc.hidden_size) == [0, 1]
    assert copied_layers("none", 2, tc.hidden_size, 2, tc.hidden_size) == []


def test_distill_from_target_layers_keeps_greedy_exact(tiny_folder, tmp_path):
    out = tmp_path / "copied"
    metrics = distill(tiny_cfg(tiny_folder, out, hidden=64, copy_layers="1"), progress=False)
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    drafter, target = load_model(str(out)), load_model(tiny_folder)
    assert drafter.config.num_hidden_layers == 1  # the list sets the depth (--layers 1 here anyway)
    assert drafter.config.num_key_value_heads == target.config.num_key_value_heads
    ids = target.tokenizer(stdlib_text("textwrap.py")).input_ids[:24]
    cfg = dict(max_new_tokens=24, ignore_eos=True, sinks=4, window=20)
    ar = generate(target, ids, GenerationConfig(**cfg))
    res = generate(target, ids, GenerationConfig(mode="triforce", budget=8, **cfg), drafter=drafter)
    assert res.tokens == ar.tokens


@pytest.mark.parametrize("kw,needle", [
    (dict(copy_layers="0,x"), "expected 'none', 'first' or target layer numbers"),
    (dict(copy_layers="0,5", hidden=64), "the target has layers 0 to 1"),
    (dict(copy_layers="first", layers=3, hidden=64), "the target has layers 0 to 1"),
    (dict(copy_layers="0", hidden=32), "needs --hidden 64"),
    (dict(copy_layers="first", hidden=32), "needs --hidden 64"),
])
def test_distill_copy_layers_bad_input(tiny_folder, tmp_path, kw, needle):
    from triforce_rt.errors import UserError

    with pytest.raises(UserError, match=needle):
        distill(tiny_cfg(tiny_folder, tmp_path / "d", **kw), progress=False)


def test_more_tokens_keep_the_labelled_blocks(tiny_folder, tmp_path, monkeypatch):
    """Teacher data comes in blocks of BLOCK_TOKENS positions, each cached: doubling --tokens labels one new block
    (other documents: its own seed), keeps the first block as it was, and keeps the held-out part."""
    import triforce_rt.distill as d

    monkeypatch.setattr(d, "BLOCK_TOKENS", 320)  # 10 records of 32 tokens
    model = load_model(tiny_folder, dtype=torch.float32)
    small, held = d.teacher_data(model, tiny_cfg(tiny_folder, tmp_path / "a", tokens=320), progress=False)
    calls = []
    real = d.label
    monkeypatch.setattr(d, "label", lambda *a, **k: calls.append(a[1:3]) or real(*a, **k))
    big, held2 = d.teacher_data(model, tiny_cfg(tiny_folder, tmp_path / "b", tokens=720), progress=False)
    assert calls == [("train", 10), ("train", 2)]  # blocks 1 and 2 (partial); block 0 and held-out from the cache
    assert len(small["tokens"]) == 10 and len(big["tokens"]) == 22
    assert all(torch.equal(big[k][:10], small[k]) for k in small)
    assert not torch.equal(big["tokens"][10:12], small["tokens"][:2])
    assert all(torch.equal(held[k], held2[k]) for k in held)


def test_skip_tokens_trains_on_the_later_blocks_only(tiny_folder, tmp_path, monkeypatch):
    """--skip-tokens leaves out whole blocks: they are never labelled, the later blocks are the ones --tokens alone
    would give, and the held-out part stays; a value that is not whole blocks, or leaves nothing, is a UserError."""
    import triforce_rt.distill as d
    from triforce_rt.errors import UserError

    monkeypatch.setattr(d, "BLOCK_TOKENS", 320)  # 10 records of 32 tokens
    model = load_model(tiny_folder, dtype=torch.float32)
    calls = []
    real = d.label
    monkeypatch.setattr(d, "label", lambda *a, **k: calls.append(a[1:3]) or real(*a, **k))
    later, held = d.teacher_data(model, tiny_cfg(tiny_folder, tmp_path / "a", tokens=720, skip_tokens=320), False)
    assert calls == [("train", 10), ("train", 2), ("heldout", 16)]  # blocks 1 and 2; block 0 never labelled
    full, held2 = d.teacher_data(model, tiny_cfg(tiny_folder, tmp_path / "b", tokens=720), progress=False)
    assert len(later["tokens"]) == 12 and all(torch.equal(full[k][10:], later[k]) for k in later)
    assert all(torch.equal(held[k], held2[k]) for k in held)
    for skip in (100, 960):
        with pytest.raises(UserError, match="--skip-tokens"):
            distill(tiny_cfg(tiny_folder, tmp_path / "c", tokens=720, skip_tokens=skip), progress=False)


def test_length_draw_follows_file_size(monkeypatch):
    """--draw file picks every file alike; --draw length in proportion to its tokens (here 2,048 against 20,480)."""
    from triforce_rt.distill import corpus

    monkeypatch.setattr(corpus, "members", lambda: {"stdlib/small.py": b"s" * 2048, "stdlib/large.py": b"l" * 20480})
    monkeypatch.setattr(corpus.zlib, "crc32", lambda b: 1)  # nothing held out

    class Bytes:  # a byte-level tokenizer: these files need no vocabulary
        def encode(self, text, add_special_tokens=False):
            return list(text.encode())

    n = 2000
    for draw, p_large in (("file", 0.5), ("length", 20480 / 22528)):
        docs = corpus.Documents(Bytes(), "train", seed=0, draw=draw)
        large = sum(docs.draw(256)[1][0] == ord("l") for _ in range(n))
        sd = (n * p_large * (1 - p_large)) ** 0.5
        assert abs(large - n * p_large) < 5 * sd, (draw, large)
    with pytest.raises(ValueError, match="draw must be one of"):
        corpus.Documents(Bytes(), "train", seed=0, draw="tokens")


def test_draw_has_its_own_teacher_cache(tiny_folder, tmp_path, monkeypatch):
    """--draw file and --draw length label and cache their own blocks (other text), side by side."""
    import triforce_rt.distill as d

    model = load_model(tiny_folder, dtype=torch.float32)
    a, _ = d.teacher_data(model, tiny_cfg(tiny_folder, tmp_path / "a", tokens=320, draw="file"), progress=False)
    b, _ = d.teacher_data(model, tiny_cfg(tiny_folder, tmp_path / "b", tokens=320, draw="length"), progress=False)
    names = sorted(p.name for p in (tmp_path / "cache" / "distill").iterdir())
    assert len(names) == 4  # train and held-out for each draw
    assert not torch.equal(a["tokens"], b["tokens"])


def test_distill_cli_shows_progress_in_a_log_unless_quiet(tiny_folder, tmp_path, capsys):
    """Run in the background (stderr not a terminal), distill still reports the teacher pass and the training, with
    the loss; --quiet silences both bars."""
    from triforce_rt.cli import main

    argv = ["distill", "--target", tiny_folder, "--layers", "1", "--hidden", "32", "--tokens", "320", "--seq-len", "32",
            "--vocab", "300", "--epochs", "1", "--batch", "4", "--answer-frac", "0"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "teacher (train)" in err and "distill" in err and "loss" in err, err
    # once a minute into a log: a run of a few seconds draws each bar at its start and end, not once per step
    for bar in (r"teacher \(train\):\s+\d+%", r"distill:\s+\d+%"):
        assert 1 <= len(re.findall(bar, err)) <= 3, err
    assert main(argv + ["--out", str(tmp_path / "b"), "--quiet"]) == 0  # the teacher data is cached by now
    assert "loss" not in capsys.readouterr().err


def test_corpus_is_the_shipped_archive(tiny_folder, tmp_path, capsys):
    """The corpus is read from the archive the package ships, never from the host: its contents (and so the shipped
    drafter's data) are the same on every machine, and distill prints nothing about it."""
    from triforce_rt.distill import corpus

    assert (len(corpus.files("train")), len(corpus.files("heldout"))) == (1896, 97)
    assert (corpus.fingerprint("train"), corpus.fingerprint("heldout")) == ("0a1bb3ab4d723b88", "5c48ff91d5f9bb16")
    distill(tiny_cfg(tiny_folder, tmp_path / "d", tokens=320, epochs=1, answer_frac=0), progress=False)
    assert capsys.readouterr().err == ""


def test_teacher_cache_follows_the_corpus_content(tiny_folder, tmp_path, monkeypatch):
    """The cached teacher data is keyed by the corpus's contents, not its number of files: a page that changes (here
    to as many bytes) is relabelled, an unchanged corpus is not."""
    import triforce_rt.distill as d
    from triforce_rt.distill import corpus

    text = stdlib_text("textwrap.py").encode()
    texts = {"stdlib/a.py": text, "stdlib/held.py": text[::-1]}
    monkeypatch.setattr(corpus, "members", lambda: texts)
    monkeypatch.setattr(corpus.zlib, "crc32", lambda b: 0 if b.endswith(b"held.py") else 1)
    model = load_model(tiny_folder, dtype=torch.float32)
    cfg = tiny_cfg(tiny_folder, tmp_path / "o", tokens=320, answer_frac=0)
    calls, real = [], d.label
    monkeypatch.setattr(d, "label", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    d.teacher_data(model, cfg, progress=False)
    d.teacher_data(model, cfg, progress=False)
    assert calls == ["train", "heldout"]
    texts["stdlib/a.py"] = text.swapcase()  # as many bytes
    d.teacher_data(model, cfg, progress=False)
    assert calls == ["train", "heldout", "train"]


def test_teacher_cache_follows_the_target_weights(tiny_folder, tmp_path, monkeypatch):
    """New weights in the same target folder (same size, a later mtime, e.g. a fine-tune saved over it) are
    relabelled, as a changed GGUF is re-converted."""
    import shutil

    import triforce_rt.distill as d

    target = tmp_path / "target"
    shutil.copytree(tiny_folder, target)
    cfg = tiny_cfg(str(target), tmp_path / "o", tokens=320, answer_frac=0)
    calls, real = [], d.label
    monkeypatch.setattr(d, "label", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    d.teacher_data(load_model(str(target), dtype=torch.float32), cfg, progress=False)
    d.teacher_data(load_model(str(target), dtype=torch.float32), cfg, progress=False)
    assert calls == ["train", "heldout"]
    weights = target / "model.safetensors"
    os.utime(weights, (weights.stat().st_atime, weights.stat().st_mtime + 60))
    d.teacher_data(load_model(str(target), dtype=torch.float32), cfg, progress=False)
    assert calls == ["train", "heldout", "train", "heldout"]


def test_distilled_head_learns_loads_and_keeps_greedy_exact(tiny_folder, tmp_path):
    """--kind head: the teacher pass keeps the target's hidden states, the head's loss falls, and the saved head drafts
    through --drafter's loader in both redrafter modes with the output identical to ar."""
    from triforce_rt.models.head import load_head

    cfg = tiny_cfg(tiny_folder, tmp_path / "head", kind="head", tokens=1280, seq_len=64, depth=3, answer_frac=0.0,
                   epochs=3, lr=3e-3)
    metrics = distill(cfg, progress=False)
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert len(metrics["agreement"]) == 3 and 0 <= metrics["mean_run"] <= 3
    target = load_model(tiny_folder)
    head = load_head(str(tmp_path / "head"), target)
    assert 0 < len(head.vocab_ids) <= 300
    ids = target.tokenizer(stdlib_text("textwrap.py")).input_ids[:24]
    cfg = dict(max_new_tokens=24, ignore_eos=True)
    ar = generate(target, ids, GenerationConfig(**cfg))
    for mode in HEAD_MODES:
        res = generate(target, ids, GenerationConfig(mode=mode, budget=8, head_cutoff=0.0, **cfg), drafter=head)
        assert res.tokens == ar.tokens and res.tiers[0]["name"] == "head", mode
        assert res.tiers[0]["drafted"] > 0 or mode == "redrafter-ngram", mode  # where the lookup matched every round
