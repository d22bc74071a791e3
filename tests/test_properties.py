"""Property tests (hypothesis) of bad input: generated flag values, batch lines and experiment documents. Every one
ends in exit 0, or in one clear line (exit 2; a batch line: its own error record and exit 1), never a traceback,
and no input file changes."""
import json
import math

import pytest
from conftest import tiny_with_smol_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from triforce_rt.cli import main
from triforce_rt.errors import UserError
from triforce_rt.experiment.schema import parse
from triforce_rt.jsonl import read_records
from triforce_rt.settings import MODES, SETTINGS

SETTLE = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
numbers = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, -1, 2**64, 0.5, 1e9, 10**6, 10**9]))
values = st.one_of(numbers, st.booleans(), st.none(), st.text(max_size=8), st.lists(st.integers(), max_size=2))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol):
    return tiny_with_smol_tokenizer(tmp_path_factory, smol, 512)


def one_line_or_ok(rc: int, err: str, ok=(0,)) -> None:
    assert "Traceback" not in err
    assert rc in ok or (rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("triforce")), (rc, err)


flag_values = st.dictionaries(
    st.sampled_from(["--temperature", "--top-p", "--top-k", "--seed", "--threads", "--gamma1", "--gamma2",
                     "--chunk-size", "--budget", "--sinks", "--window", "--refresh", "--ngram", "--max-new-tokens",
                     "--prefill-chunk"]),
    st.one_of(numbers.map(str), st.text(max_size=6)), max_size=3)


@SETTLE
@given(flags=flag_values, mode=st.sampled_from(list(MODES)))
def test_generated_flags(tiny, capsys, flags, mode):
    argv = ["generate", "--model", tiny, "--prompt", "the quick brown fox " * 4, "--mode", mode, "--drafter", tiny,
            "--max-new-tokens", "3", "--threads", "1"]
    for flag, value in flags.items():
        argv += [flag, value]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: a value of the wrong type
        rc = e.code
    one_line_or_ok(rc, capsys.readouterr().err)


line_values = st.fixed_dictionaries({"id": st.one_of(st.text(max_size=6), st.integers(), st.none())},
                                    optional={"prompt": st.one_of(st.text(max_size=20), numbers),
                                              "messages": st.one_of(st.lists(st.dictionaries(
                                                  st.sampled_from(["role", "content"]), values, max_size=2),
                                                  max_size=2), values),
                                              **{k: values for k, m in SETTINGS.items() if m["line"]},
                                              "max_tokens": values})


@SETTLE
@given(lines=st.lists(line_values, min_size=1, max_size=4))
def test_generated_batch_lines(tiny, capsys, tmp_path_factory, lines):
    d = tmp_path_factory.mktemp("batch")
    src, out = d / "in.jsonl", d / "out.jsonl"
    for line in lines:  # keep every value small enough to run: this is about refusing, not decoding long
        if isinstance(line.get("max_new_tokens"), int) and line["max_new_tokens"] > 3:
            line["max_new_tokens"] = 3
    text = "\n".join(json.dumps(line) for line in lines) + "\n"
    src.write_text(text)
    rc = main(["batch", str(src), "--out", str(out), "--model", tiny, "--max-new-tokens", "2", "--quiet"])
    one_line_or_ok(rc, capsys.readouterr().err, ok=(0, 1))
    assert src.read_text() == text
    ids = [r["id"] for r in read_records(str(out))]
    assert len(ids) == len(set(ids)) == len(lines)


documents = st.dictionaries(
    st.sampled_from(["name", "prompt", "model", "modes", "sweep", "max_new_tokens", "temperature", "top_p", "top_k",
                     "seed", "repeats", "threads", "chat", "baselines", "bogus"]),
    st.one_of(values, st.fixed_dictionaries({"text": st.just("hi")}, optional={"tokens": values}),
              st.dictionaries(st.sampled_from(["context", "budget", "chunk_size", "temperature", "top_p", "gamma1"]),
                              st.lists(numbers, min_size=0, max_size=3), max_size=3),
              st.lists(st.sampled_from(list(MODES) + ["warp"]), max_size=3)), max_size=8)


@SETTLE
@given(raw=documents)
def test_generated_experiment_documents(raw):
    """The schema accepts a document, with every value checked as its flag is, or refuses it with a UserError."""
    try:
        exp = parse({"name": "t", "prompt": {"text": "hi"}, **raw})
    except UserError as e:
        assert "\n" not in str(e)
        return
    for name in ("temperature", "top_p"):
        assert math.isfinite(getattr(exp, name))
    assert all(v >= 1 for v in exp.sweep.get("context", [1]))
