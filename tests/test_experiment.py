"""`triforce run`: schema errors are one line with the key and exit 2; a quick run writes results, tables and a
plot; a re-run resumes (skips finished rows) and a torn last line is repaired."""
import json
import os

import pytest
import yaml

from triforce_rt.cli import main
from triforce_rt.experiment import load, run_experiment
from triforce_rt.experiment.runner import plan
from triforce_rt.jsonl import read_records


def write(tmp_path, doc, name="exp.yaml") -> str:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return str(path)


BASE = {"name": "t", "prompt": {"file": "{stdlib}/textwrap.py", "tokens": 40}}


@pytest.mark.parametrize("change,needle", [
    ({"bogus": 1}, "bogus: unknown key"),
    ({"max_new_tokens": "many"}, "max_new_tokens: expected an integer, got 'many'"),
    ({"chat": "yes"}, "chat: expected true or false"),
    ({"modes": ["ar", "warp"]}, "modes[1]: unknown mode 'warp'"),
    ({"sweep": {"budget": [8, "big"]}}, "sweep.budget[1]: expected an integer, got 'big'"),
    ({"sweep": {"colour": [1]}}, "sweep.colour: unknown key"),
    ({"sweep": {"budget": []}}, "sweep.budget: expected a non-empty list"),
    ({"baselines": ["vllm"]}, "baselines[0]: unknown baseline 'vllm'"),
    ({"prompt": {"file": "/no/such.txt"}}, "prompt: file not found"),
    ({"prompt": {"text": "hi", "file": "x"}}, "prompt: give exactly one of file, files or text"),
    ({"prompt": {"text": "hi", "tokens": "ten"}}, "prompt.tokens: expected an integer"),
    ({"repeats": 0}, "repeats: must be at least 1"),
    ({"threads": 0}, "threads must be between 1 and this machine's"),
    ({"kernels": "gemm"}, "kernels: unknown 'gemm' (choose from auto, torch, numba)"),
    ({"name": "x" * 300}, "name: must be a folder name of 1 to 100 characters"),
])
def test_schema_errors_name_the_key(tmp_path, capsys, change, needle):
    path = write(tmp_path, {**BASE, **change})
    assert main(["run", path]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_malformed_yaml_and_missing_keys(tmp_path, capsys):
    assert main(["run", write(tmp_path, "name: [unclosed\nprompt: {text: hi}\n")]) == 2
    assert "malformed YAML at line" in capsys.readouterr().err
    assert main(["run", write(tmp_path, {"prompt": {"text": "hi"}})]) == 2
    assert "missing required key 'name'" in capsys.readouterr().err
    path = write(tmp_path, "- just\n- a list\n")
    assert main(["run", path]) == 2
    assert f"{path}: expected a mapping" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "none.yaml")]) == 2
    assert "experiment file not found" in capsys.readouterr().err


def test_impossible_setting_fails_before_loading(tmp_path, capsys):
    path = write(tmp_path, {**BASE, "model": "/no/such/model", "modes": ["self-spec"], "sweep": {"budget": [4]},
                            "max_new_tokens": 8})
    assert main(["run", path]) == 2
    assert "at least one chunk" in capsys.readouterr().err  # not "model not found": nothing was loaded


def test_a_sweep_key_applies_only_to_the_modes_that_read_it(tmp_path, capsys):
    """draft_quant means nothing to ar (it has no self-drafting tier): ar runs once and is not refused."""
    path = write(tmp_path, {**BASE, "model": "/no/such/model", "modes": ["ar", "self-spec"],
                            "sweep": {"draft_quant": ["none", "q4"]}})
    rows = plan(load(path), [("textwrap.py", [])])
    assert [(r["mode"], r["params"]) for r in rows] == [("ar", {}), ("self-spec", {"draft_quant": "none"}),
                                                        ("self-spec", {"draft_quant": "q4"})]
    assert main(["run", path]) == 2 and "model not found" in capsys.readouterr().err  # past the settings check


def test_quick_run_writes_results_and_resumes(tmp_path, tiny_folder):
    exp = {"name": "tiny", "model": tiny_folder, "drafter": tiny_folder, "prompt": {"file": "{stdlib}/textwrap.py"},
           "max_new_tokens": 12, "modes": ["ar", "self-spec", "triforce"], "baselines": ["hf-generate", "hf-assisted"],
           "sweep": {"context": [24, 40], "budget": [8, 16, 32], "sinks": [4], "window": [16]}}
    path = write(tmp_path, exp)
    out = str(tmp_path / "out")
    run_experiment(load(path), out, is_quick=True, progress=False)
    rows = read_records(os.path.join(out, "results.jsonl"))
    # per context: ar and the 2 baselines once, self-spec and triforce for the first two budgets (quick keeps two)
    assert len(rows) == 2 * (3 + 2 + 2)
    assert {r["mode"] for r in rows} == {"ar", "self-spec", "triforce", "hf-generate", "hf-assisted"}
    for name in ("results.md", "results.csv", "plot.png", "machine.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    md = open(os.path.join(out, "results.md")).read()
    assert "| tiny |" not in md and "vs_ar" in md and "True" in md and "False" not in md  # greedy: identical to ar

    # A torn last line (a kill mid-write) is cut off, and a re-run writes only the missing rows.
    with open(os.path.join(out, "results.jsonl"), "rb+") as f:
        data = f.read()
        cut = data.rstrip(b"\n").rfind(b"\n") + 1
        f.seek(cut)
        f.truncate()
        f.write(data[cut : cut + 30])  # half of the last record
    run_experiment(load(path), out, is_quick=True, progress=False)
    again = read_records(os.path.join(out, "results.jsonl"))
    assert len(again) == len(rows)
    assert sorted(json.dumps(r["key"], sort_keys=True) for r in again) == sorted(
        json.dumps(r["key"], sort_keys=True) for r in rows)


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(os.path.dirname(__file__), "..",
                                                                            "experiments")) if f.endswith(".yaml")))
def test_shipped_experiments_validate(name):
    exp = load(os.path.join(os.path.dirname(__file__), "..", "experiments", name))
    assert exp.name == name[:-5] and "ar" in exp.modes


@pytest.mark.parametrize("change,needle", [
    ({"sweep": {"budget": [8, 0]}}, "sweep.budget[1]: budget must be at least 1 (got 0)"),
    ({"sweep": {"temperature": [-1.0]}}, "sweep.temperature[0]: temperature must be a finite number >= 0"),
    ({"sweep": {"top_p": [5]}}, "sweep.top_p[0]: top_p must be a finite number in (0, 1]"),
    ({"sweep": {"context": [-5]}}, "sweep.context[0]: context must be at least 1"),
    ({"top_k": -3}, "top_k: top_k must be at least 0"),
    ({"sweep": {"draft_dtype": ["int3"]}}, "unknown draft_dtype 'int3'"),
    ({"modes": ["self-spec"], "sweep": {"budget": [4], "chunk_size": [8]}}, "must hold at least one chunk"),
    ({"sweep": {"gamma1": list(range(1, 101)), "gamma2": list(range(1, 101)), "budget": list(range(8, 108))}},
     "expands to 1,000,000 runs"),
])
def test_impossible_settings_are_the_flags_errors(tmp_path, capsys, change, needle):
    """A YAML file is checked as the flags are (settings.check_setting), before any model loads."""
    path = write(tmp_path, {**BASE, **change})
    assert main(["run", path, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    assert main(["run", write(tmp_path, BASE), "--out", "/etc/hostname/out"]) == 2
    err = capsys.readouterr().err
    assert "cannot create that folder" in err and len(err.strip().splitlines()) == 1, err
