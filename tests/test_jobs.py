"""summarize and batch: real documents, over-long refusal and fitting, malformed lines, and kill-and-resume."""
import io
import json
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import tiny_with_smol_tokenizer

from triforce_rt.cli import main
from triforce_rt.distill.corpus import path
from triforce_rt.jsonl import read_records
from triforce_rt.speculation.auto import PLANS

LICENSE = path("licenses/Apache-2.0")  # about 2,600 SmolLM2 tokens, from the shipped corpus


@pytest.fixture(scope="module")
def tiny512(tmp_path_factory, smol):
    """A tiny random model with SmolLM2's tokenizer and a 512-token context (long documents overflow it)."""
    return tiny_with_smol_tokenizer(tmp_path_factory, smol, 512)


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_summarize_a_real_document(capsys, tmp_path):
    out = tmp_path / "summary.md"
    rc, _, err = run(capsys, "summarize", LICENSE, "--max-new-tokens", "24", "--out", str(out), "--quiet")
    assert rc == 0, err
    text = out.read_text()
    assert len(text.strip()) > 20
    last = err.strip().splitlines()[-1]
    assert last.startswith("[auto]") and "accepted retrieval" in last and "| plan " in last and "tok/s" in last


def test_summarize_several_files_streams_each_under_its_name(capsys, tiny512, tmp_path):
    a, b = tmp_path / "a.md", tmp_path / "b.txt"
    a.write_text("# Notes\n\nThe meeting moved to Tuesday.\n")
    b.write_text("Shopping: eggs, milk, bread.\n")
    rc, out, err = run(capsys, "summarize", str(a), str(b), "--model", tiny512, "--mode", "self-spec",
                       "--max-new-tokens", "8", "--ignore-eos")
    assert rc == 0, err
    assert out.startswith("## a.md\n\n") and "\n## b.txt\n\n" in out
    assert len([line for line in err.splitlines() if line.startswith("[self-spec]")]) == 2


def test_summarize_stats_start_their_own_line_on_a_shared_terminal(tmp_path, monkeypatch):
    """stdout and stderr on one terminal: the summary's last line and the stats line stay apart (SmolLM2's greedy
    summary does not end in a newline)."""

    doc = tmp_path / "a.md"
    doc.write_text("The meeting moved to Tuesday.\n")
    term = io.StringIO()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stderr", term)
    assert main(["summarize", str(doc), "--mode", "ar", "--max-new-tokens", "8", "--ignore-eos", "--quiet"]) == 0
    text = term.getvalue()
    stats = [line for line in text.splitlines() if "[ar]" in line]
    assert len(stats) == 1 and stats[0].startswith("[ar]") and text.split("[ar]")[0].strip(), text


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stdout_is_terminal", [False, True])
def test_summarize_progress_follows_stderr(tmp_path, monkeypatch, tiny512, stdout_is_terminal):
    """Bars go to stderr whenever it is a terminal (`summarize doc > summary.md` too); the decode bar stays off
    only while the text itself streams to a terminal."""
    doc = tmp_path / "a.md"
    doc.write_text("The meeting moved to Tuesday.\n")
    out, err = (Terminal() if stdout_is_terminal else io.StringIO()), Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    assert main(["summarize", str(doc), "--model", tiny512, "--mode", "ar", "--max-new-tokens", "8",
                 "--ignore-eos"]) == 0
    assert "prefill:" in err.getvalue() and ("decode:" in err.getvalue()) != stdout_is_terminal, err.getvalue()
    assert "[ar] prompt" in err.getvalue()


def test_summarize_refuses_an_overlong_document_with_both_counts(capsys, tiny512):
    rc, out, err = run(capsys, "summarize", LICENSE, "--model", tiny512, "--mode", "ar", "--max-new-tokens", "16")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "Apache-2.0 is 2" in err and "tokens, but" in err and "context of 512" in err and "--fit" in err


@pytest.mark.parametrize("fit", ["truncate", "map-reduce"])
def test_summarize_fits_an_overlong_document(capsys, tiny512, fit):
    rc, out, err = run(capsys, "summarize", LICENSE, "--model", tiny512, "--mode", "self-spec", "--max-new-tokens",
                       "16", "--ignore-eos", "--fit", fit)
    assert rc == 0, err
    runs = [line for line in err.splitlines() if line.startswith("[self-spec]")]
    parts = [line for line in err.splitlines() if line.startswith("[Apache-2.0: part ")]
    assert len(runs) == (1 if fit == "truncate" else len(parts) + 1) and (fit == "truncate") == (not parts), err
    assert all(int(r.split("prompt ")[1].split(" ")[0]) <= 512 - 16 for r in runs)


def write_input(path, n, bad=(), vary=True):
    """n lines; vary: per-line max_new_tokens (so no two neighbours share settings and batch together)."""
    with open(path, "w") as f:
        for i in range(n):
            if i in bad:
                f.write('{"id": "broken", "prompt": \n')
            else:
                extra = {"max_new_tokens": 6 + i % 3} if vary else {}
                f.write(json.dumps({"id": f"r{i}", "prompt": f"Item {i}: the quick brown fox", **extra}) + "\n")


def test_batch_malformed_lines_get_error_records(capsys, tiny512, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, 5, bad={2})
    with open(src, "a") as f:
        f.write('{"id": "r0", "prompt": "again"}\n{"id": "np"}\n{"id": "long", "prompt": "' + "word " * 600 + '"}\n')
        f.write('{"id": "msg", "messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 4}\n')
    rc, _, err = run(capsys, "batch", str(src), "--out", str(out), "--model", tiny512, "--ignore-eos")
    assert rc == 1 and "5 generated, 4 errors, 0 already in" in err, err  # the error records make the exit code 1
    recs = {r["id"]: r for r in read_records(str(out))}
    assert recs["line:3"]["error"].startswith("not JSON")
    assert "duplicate id 'r0'" in recs["line:6"]["error"]
    assert "missing 'prompt'" in recs["np"]["error"]
    assert "exceeds the model's context" in recs["long"]["error"]
    assert recs["r1"]["new_tokens"] == 7 and recs["msg"]["new_tokens"] == 4 and recs["r4"]["tiers"]
    assert recs["r1"]["mode"] == "auto" and recs["r1"]["plan"][0]["mode"] in PLANS  # the default, and its plan
    assert len(recs) == 9
    # stderr is not a terminal here, as under nohup: the bar shows, drawn at its start and end, not per record
    assert 1 <= len(re.findall(r"batch:\s+\d+%", err)) <= 3, err
    # a re-run skips the generated lines and runs the error lines again (still errors: exit 1, one record per id);
    # once a line is fixed, its record replaces the error record
    rc, _, err = run(capsys, "batch", str(src), "--out", str(out), "--model", tiny512, "--ignore-eos")
    assert rc == 1 and "0 generated, 4 errors, 5 already in" in err and "(4 error records run again)" in err, err
    assert sorted(r["id"] for r in read_records(str(out))) == sorted(recs)
    src.write_text(src.read_text().replace('{"id": "np"}', '{"id": "np", "prompt": "fixed"}'))
    rc, _, err = run(capsys, "batch", str(src), "--out", str(out), "--model", tiny512, "--ignore-eos")
    again = {r["id"]: r for r in read_records(str(out))}
    assert rc == 1 and "1 generated, 3 errors" in err and len(again) == 9 and again["np"]["new_tokens"] > 0, err


def test_batched_lines_equal_one_at_a_time(capsys, tiny512, tmp_path):
    """--batch-size 3: lines that share their settings but for max_new_tokens decode together (ragged prompts,
    self-spec), continuously (a line that ends is replaced at once) or three at a time, and give the same greedy
    records as one at a time; a line with other settings (a seed) is scheduled apart, an error line is its record."""
    src = tmp_path / "in.jsonl"
    lines = [{"id": f"r{i}", "prompt": "Item " + "the quick brown fox " * (1 + 3 * i)} for i in range(7)]
    lines[4]["max_new_tokens"] = 5
    lines[5]["seed"] = 3
    src.write_text("\n".join(map(json.dumps, lines[:6])) + '\n{"id": "bad"\n' + json.dumps(lines[6]) + "\n")
    recs = {}
    for b, schedule in ((1, "continuous"), (3, "continuous"), (3, "static")):
        out = tmp_path / f"out{b}{schedule}.jsonl"
        rc, _, err = run(capsys, "batch", str(src), "--out", str(out), "--model", tiny512, "--ignore-eos",
                         "--mode", "self-spec", "--max-new-tokens", "12", "--batch-size", str(b),
                         "--schedule", schedule)
        assert rc == 1, err  # the malformed line's error record
        recs[b, schedule] = {r["id"]: r for r in read_records(str(out))}
    tokens = [{k: r.get("tokens") for k, r in got.items()} for got in recs.values()]
    assert tokens[0] == tokens[1] == tokens[2] and len(tokens[0]["r4"]) == 5
    for schedule, most in (("continuous", {2, 3}), ("static", {3})):  # continuous: lines end as others join
        sizes = {k: r["batch_size"] for k, r in recs[3, schedule].items() if "error" not in r}
        assert sizes["r5"] == 1 and max(sizes.values()) in most, sizes
    assert "not JSON" in recs[3, "static"]["line:7"]["error"]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_batch_killed_and_restarted_has_every_id_once(tiny512, tmp_path, batch_size):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, 40, vary=batch_size == 1)
    cmd = [sys.executable, "-m", "triforce_rt", "batch", str(src), "--out", str(out), "--model", tiny512,
           "--ignore-eos", "--max-new-tokens", "30", "--threads", "1", "--batch-size", str(batch_size)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 1):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = out.read_bytes().count(b"\n")
    assert 1 <= first < 40, "the kill must land mid-job"
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ids = [r["id"] for r in read_records(str(out))]
    assert sorted(ids) == sorted(f"r{i}" for i in range(40))


def test_a_bad_line_only_costs_its_own_record(capsys, tiny512, tmp_path):
    """Settings a line gives are checked as the flags are; a bad one is that line's error record, and the job goes
    on (NaN is valid JSON for Python's reader)."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    bad = {"nan": '"temperature": NaN', "neg": '"temperature": -1', "seed": '"seed": 1e400',
           "big": '"seed": 18446744073709551616', "topp": '"top_p": 5', "empty": '"messages": []',
           "content": '"messages": [{"role": "user", "content": 3}]', "type": '"max_new_tokens": "4"'}
    lines = [f'{{"id": "{k}", "prompt": "hi", {v}}}' for k, v in bad.items()] + ['{"id": "ok", "prompt": "hi"}']
    src.write_text("\n".join(lines) + "\n")
    rc, _, err = run(capsys, "batch", str(src), "--out", str(out), "--model", tiny512, "--max-new-tokens", "3")
    recs = {r["id"]: r for r in read_records(str(out))}
    assert rc == 1 and "1 generated, 8 errors" in err, err
    assert "temperature must be a finite number >= 0 (got nan)" in recs["nan"]["error"]
    assert "temperature must be a finite number >= 0 (got -1.0)" in recs["neg"]["error"]
    assert "seed must be an integer" in recs["seed"]["error"] and "seed must be at most" in recs["big"]["error"]
    assert "top_p must be" in recs["topp"]["error"] and "max_new_tokens must be an integer" in recs["type"]["error"]
    assert "non-empty list" in recs["empty"]["error"] and "string values" in recs["content"]["error"]
    assert recs["ok"]["new_tokens"] == 3


@pytest.mark.parametrize("verb", ["summarize", "batch"])
def test_no_output_mistake_destroys_a_file(capsys, tmp_path, verb):
    """--out naming an input, a file this tool did not write, a folder or a missing folder: one line, exit 2,
    before any model loads, and every file as it was."""
    doc = tmp_path / "in.jsonl"
    doc.write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "there"}')
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nlast line without a newline")
    cases = [(doc, "is also an input"), (tmp_path / "." / "in.jsonl", "is also an input"),
             (tmp_path, "is a directory"), (tmp_path / "no" / "out.jsonl", "does not exist")]
    if verb == "batch":
        cases.append((notes, "not this tool's output"))
    before = {p: p.read_bytes() for p in (doc, notes)}
    for out, needle in cases:
        rc, _, err = run(capsys, verb, str(doc), "--out", str(out), "--model", "/no/such/model")
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, (out, err)
        assert {p: p.read_bytes() for p in (doc, notes)} == before


def test_ids_stay_unique_whatever_the_input_spells(capsys, tiny512, tmp_path):
    """A line without a usable id is named line:N, and line:N.K where an input id already spells line:N."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": "line:2", "prompt": "hi"}\n{"id": \n{"prompt": "no id"}\n')
    rc, _, err = run(capsys, "batch", str(src), "--out", str(out), "--model", tiny512, "--max-new-tokens", "2")
    ids = [r["id"] for r in read_records(str(out))]
    assert rc == 1 and sorted(ids) == ["line:2", "line:2.1", "line:3"], ids


def test_input_text_surprises(capsys, tiny512, tmp_path):
    """A byte-order mark costs no record; an unknown key and a line that is not UTF-8 are that line's errors; a
    prompt file that is not UTF-8 text is a one-line error; --fit truncate says how much it dropped."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(b'\xef\xbb\xbf{"id": "bom", "prompt": "hi"}\n{"id": "typo", "prompt": "hi", "max_tokens": 3}\n'
                    b'{"id": "latin", "prompt": "caf\xe9"}\n')
    rc, _, err = run(capsys, "batch", str(src), "--out", str(out), "--model", tiny512, "--max-new-tokens", "2")
    recs = {r["id"]: r for r in read_records(str(out))}
    assert recs["bom"]["new_tokens"] == 2 and "unknown key 'max_tokens'" in recs["typo"]["error"]
    assert "not UTF-8" in recs["line:3"]["error"] and rc == 1
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9 au lait")
    for verb in ("generate", "summarize"):
        args = ["--prompt-file", str(bad)] if verb == "generate" else [str(bad)]
        rc, _, err = run(capsys, verb, *args, "--model", tiny512, "--mode", "ar")
        assert rc == 2 and "is not UTF-8 text" in err and len(err.strip().splitlines()) == 1, err
    rc, _, err = run(capsys, "summarize", LICENSE, "--model", tiny512, "--mode", "ar", "--max-new-tokens", "4",
                     "--fit", "truncate", "--quiet")
    assert rc == 0 and re.search(r"--fit truncate kept \d+ of its \d+ tokens .* dropped \d+ from the middle", err), err


def test_a_failure_while_decoding_is_the_lines_error_record(capsys, tiny512, tmp_path, monkeypatch):
    """Any exception while a line decodes (here a forced one on its prompt) becomes that line's error record, with
    its type; the job goes on and the other lines get their records."""
    from triforce_rt import scheduler

    real = scheduler.Prefill.step

    def flaky(self):
        if len(self.reqs[0].ids) > 3:  # line b
            raise RuntimeError("boom")
        return real(self)
    monkeypatch.setattr(scheduler.Prefill, "step", flaky)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "one two three four five six"}\n')
    rc, _, err = run(capsys, "batch", str(src), "--out", str(out), "--model", tiny512, "--max-new-tokens", "2")
    recs = {r["id"]: r for r in read_records(str(out))}
    assert rc == 1 and recs["a"]["new_tokens"] == 2, err
    assert [r.get("error") for r in recs.values() if "error" in r] == ["RuntimeError: boom"], recs


def test_bad_schedule_settings_are_one_line(capsys, tiny512, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, 2)
    base = ["batch", str(src), "--out", str(out), "--model", tiny512]
    for flags, want in ((["--mode", "self-spec", "--kv-block", "3"], "--kv-block 3 must divide the retrieval chunk "
                                                                     "size (8) of mode 'self-spec'"),
                        (["--kv-memory", "1"], "--kv-memory needs --kv-block"),
                        (["--kv-block", "-1"], "--kv-block must be 0"),
                        (["--batch-size", "2", "--offload", "kv"], "decodes one sequence at a time")):
        rc, _, err = run(capsys, *base, *flags)
        assert rc == 2 and want in err and len(err.strip().splitlines()) == 1, (flags, err)
    assert not out.exists()
