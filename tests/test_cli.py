"""The CLI: JSON contract, plain streaming output, and one-line errors with exit code 2."""
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import child_env, stdlib_text

from triforce_rt.cli import main

JSON_KEYS = {"mode", "prompt_tokens", "new_tokens", "tokens", "text", "prefill_seconds", "decode_seconds",
             "decode_tokens_per_second", "tiers", "tokens_per_target_call", "plan"}


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_output(capsys, tiny_folder):
    rc, out, err = run_cli(capsys, "generate", "--model", tiny_folder, "--prompt", "def f(x):", "--max-new-tokens", "6",
                           "--ignore-eos", "--json", "--mode", "ar")
    assert rc == 0
    obj = json.loads(out.strip().splitlines()[-1])
    assert JSON_KEYS <= set(obj)
    assert obj["mode"] == "ar" and obj["new_tokens"] == len(obj["tokens"]) == 6
    assert obj["plan"] == [{"at": 0, "mode": "ar"}]
    assert [t["name"] for t in obj["tiers"]] == ["target"]
    assert set(obj["tiers"][0]) == {"name", "drafted", "accepted", "rejected", "calls", "seconds"}


def test_plain_output_streams_the_same_text_as_json(capsys, tiny_folder):
    argv = ["generate", "--model", tiny_folder, "--prompt", "hello", "--max-new-tokens", "12", "--ignore-eos",
            "--chat", "--temperature", "1.0", "--seed", "3"]
    rc, out, err = run_cli(capsys, *argv, "--json")
    text = json.loads(out.strip().splitlines()[-1])["text"]
    assert rc == 0 and text.strip()
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0 and out == text + "\n"
    assert "tok/s" in err.splitlines()[-1]


def test_settings_past_what_a_run_needs_cost_nothing(capsys, smol):
    """A refresh interval past the new tokens sizes the retrieval tail by the new tokens (it asked for 23 TB)."""
    rc, _, err = run_cli(capsys, "generate", "--prompt", "hi", "--mode", "self-spec", "--refresh", "1000000000",
                         "--max-new-tokens", "2")
    assert rc == 0 and "[self-spec]" in err, err


@pytest.mark.parametrize("argv,needle", [
    (["--model", "/no/such/model", "--prompt", "hi"], "model not found"),
    (["--prompt", "   "], "prompt is empty"),
    (["--prompt-file", "/no/such/file.txt"], "prompt file not found"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "at least 1"),
    (["--prompt", "hi", "--device", "cuda"], "CUDA is not available"),
    (["--prompt", "hi", "--mode", "self-spec", "--budget", "4"], "at least one chunk"),
    (["--prompt", "hi", "--mode", "triforce", "--gamma1", "0"], "gamma1 must be at least 1"),
    (["--prompt", "hi", "--mode", "self-spec", "--gamma2", "-2"], "gamma2 must be at least 1"),
    (["--prompt", "hi", "--mode", "self-spec", "--chunk-size", "0"], "chunk_size must be at least 1"),
    (["--prompt", "hi", "--mode", "streaming-spec", "--window", "0"], "window must be at least 1"),
    (["--prompt", "hi", "--mode", "ngram", "--ngram", "1"], "ngram must be at least 2"),
    (["--prompt", "hi", "--mode", "draft", "--drafter", "/no/such/drafter"], "drafter not found"),
    (["--prompt", "hi", "--offload", "weights"], "need --device cuda"),
    (["--prompt", "hi", "--gpu-memory", "24"], "need --device cuda"),
    (["--prompt", "hi", "--attn", "flash"], "flash-attn"),
    (["--prompt", "hi", "--attn", "numba", "--dtype", "bfloat16"], "runs on the CPU in float32"),
    (["--prompt", "hi", "--threads", "0"], "--threads must be between 1 and"),
    (["--prompt", "hi", "--threads", str(2**40)], "--threads must be between 1 and"),
    (["--prompt", "hi", "--temperature", "nan"], "temperature must be a finite number >= 0 (got nan)"),
    (["--prompt", "hi", "--temperature", "inf"], "temperature must be a finite number"),
    (["--prompt", "hi", "--seed", str(2**64)], "seed must be at most"),
    (["--prompt", "hi", "--mode", "self-spec", "--chunk-size", "1000000"], "exceeds the model's context"),
    (["--prompt", "hi", "--mode", "triforce", "--gamma1", "1000000"], "exceed the model's context"),
    (["--prompt-file", "/"], "prompt file is not a file"),
])
def test_bad_input_one_line_exit_2(capsys, smol, argv, needle):
    """smol: the default model's one-time GGUF conversion (its progress bar on stderr) is done before, since a check
    that needs the model's context (chunk size, sinks) loads it."""
    rc, out, err = run_cli(capsys, "generate", *argv)
    assert rc == 2
    assert needle in err and len(err.strip().splitlines()) == 1


def test_cuda_out_of_memory_suggests_offload(capsys, monkeypatch):
    import torch

    from triforce_rt import cli

    def oom(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(cli, "cmd_generate", oom)
    rc, out, err = run_cli(capsys, "generate", "--prompt", "hi")
    assert rc == 2 and "--offload weights" in err and len(err.strip().splitlines()) == 1


def test_no_default_drafter_for_another_model(capsys, tiny_folder):
    rc, out, err = run_cli(capsys, "generate", "--model", tiny_folder, "--prompt", "hi", "--mode", "triforce")
    assert rc == 2 and "no default drafter exists for this model" in err and "triforce distill" in err
    rc, out, err = run_cli(capsys, "generate", "--model", tiny_folder, "--prompt", "hi", "--mode", "redrafter")
    assert rc == 2 and "no default drafter exists" in err and "triforce distill --kind head" in err


@pytest.fixture(scope="module")
def tiny_head(tiny_folder, tmp_path_factory):
    """A (random) recurrent head for tiny_folder's model, saved as `triforce distill --kind head` saves one."""
    from test_hierarchy import random_head

    from triforce_rt import load_model

    folder = str(tmp_path_factory.mktemp("head"))
    random_head(load_model(tiny_folder)).save(folder, {})
    return folder


def test_redrafter_cli_equals_ar(capsys, tiny_folder, tiny_head):
    base = ["generate", "--model", tiny_folder, "--prompt", "def f(x):", "--max-new-tokens", "12", "--ignore-eos",
            "--json"]
    rc, ar, _ = run_cli(capsys, *base)
    for mode, cutoff in (("redrafter", "0.2"), ("triforce-redrafter", "0"), ("redrafter-ngram", "0.05")):
        rc, out, err = run_cli(capsys, *base, "--mode", mode, "--drafter", tiny_head, "--head-cutoff", cutoff)
        assert rc == 0, err
        assert json.loads(out)["tokens"] == json.loads(ar)["tokens"]
        assert json.loads(out)["tiers"][0]["name"] == "head"


@pytest.mark.parametrize("mode,which,needle", [
    ("redrafter", "model", "needs a recurrent draft head"),
    ("draft", "head", "needs a model"),
    ("redrafter", "missing", "drafter not found"),
    ("redrafter", "corrupt", "not a readable recurrent draft head"),
])
def test_drafter_of_the_wrong_kind(capsys, tiny_folder, tiny_head, tmp_path, mode, which, needle):
    corrupt = tmp_path / "head"
    corrupt.mkdir()
    (corrupt / "config.json").write_text(open(os.path.join(tiny_head, "config.json")).read())
    (corrupt / "head.safetensors").write_bytes(b"not safetensors")
    path = {"model": tiny_folder, "head": tiny_head, "missing": "/no/such/head", "corrupt": str(corrupt)}[which]
    rc, out, err = run_cli(capsys, "generate", "--model", tiny_folder, "--prompt", "hi", "--mode", mode,
                           "--drafter", path)
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("argv,needle", [
    (["--seq-len", "8"], "--seq-len > 16"),
    (["--layers", "0"], "--layers must be at least 1"),
    (["--target", "/no/such/model"], "model not found"),
    (["--init", "/no/such/drafter"], "drafter not found"),
    (["--copy-layers", "0,x"], "expected 'none', 'first' or target layer numbers"),
    (["--epochs", "nan"], "finite --epochs > 0"),
    (["--lr", "-1"], "--lr > 0"),
    (["--out", "/etc/hostname/d"], "cannot create that folder"),
    (["--kind", "head", "--copy-layers", "first"], "--kind head takes neither"),
    (["--kind", "head", "--seq-len", "6", "--depth", "5"], "--seq-len > --depth + 1"),
    (["--kind", "head", "--depth", "0"], "--depth must be at least 1"),
])
def test_distill_bad_input_one_line_exit_2(capsys, argv, needle, tmp_path):
    rc, out, err = run_cli(capsys, "distill", "--out", str(tmp_path / "d"), *argv)
    assert rc == 2
    assert needle in err and len(err.strip().splitlines()) == 1


def test_unknown_mode_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "hi", "--mode", "nonsense"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice" in err and len(err.strip().splitlines()) == 1


def test_speculative_mode_json_and_summary(capsys, tiny_folder):
    """triforce with the tiny model as its own drafter: per-tier stats cheapest first, and the stderr summary."""
    base = ["generate", "--model", tiny_folder, "--prompt", "def f(x): return x * 2\n" * 2, "--max-new-tokens", "12",
            "--ignore-eos", "--json"]
    spec = ["--mode", "triforce", "--drafter", tiny_folder, "--budget", "8", "--sinks", "4", "--window", "16",
            "--gamma1", "2", "--gamma2", "3"]
    rc, out, err = run_cli(capsys, *base, *spec)
    obj = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and [t["name"] for t in obj["tiers"]] == ["drafter", "retrieval", "target"]
    assert obj["tokens_per_target_call"] >= 1.0
    assert "tok/target call" in err.splitlines()[-1] and "retrieval" in err.splitlines()[-1]
    ar = json.loads(run_cli(capsys, *base)[1].strip().splitlines()[-1])
    assert obj["tokens"] == ar["tokens"]


def test_drafter_with_another_vocabulary(capsys, tiny_folder, smol, tmp_path):
    from conftest import hf_model

    argv = ["generate", "--model", tiny_folder, "--drafter", str(tmp_path), "--prompt", "hi", "--mode", "draft",
            "--max-new-tokens", "8", "--window", "16"]
    hf_model(vocab_size=100, tie_word_embeddings=True).save_pretrained(tmp_path)
    capsys.readouterr()  # the save's progress bar
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and "no usable tokenizer" in err and len(err.strip().splitlines()) == 1
    smol.tokenizer.save_pretrained(tmp_path)
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and "vocabulary (100) differs" in err and len(err.strip().splitlines()) == 1


def test_prompt_longer_than_context(capsys, tiny_folder):
    rc, out, err = run_cli(capsys, "generate", "--model", tiny_folder, "--prompt", "word " * 100)
    assert rc == 2 and "exceeds the model's context of 64 tokens" in err and len(err.strip().splitlines()) == 1


def test_pickle_checkpoint_refused(capsys, tmp_path, tiny_folder):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if os.path.exists(os.path.join(tiny_folder, name)):
            with open(os.path.join(tiny_folder, name), "rb") as src, open(tmp_path / name, "wb") as dst:
                dst.write(src.read())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    rc, out, err = run_cli(capsys, "generate", "--model", str(tmp_path), "--prompt", "hi")
    assert rc == 2 and "--allow-pickle" in err


def test_console_entry_bad_dtype_and_real_model_path(tmp_path):
    """Through a real process: argparse errors are one line too, and a real prompt file works."""
    env = child_env(PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "triforce_rt", "generate", "--prompt", "x", "--dtype", "float8"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "invalid choice" in r.stderr
    prompt = tmp_path / "prompt.py"
    prompt.write_text(stdlib_text("textwrap.py")[:1000])
    r = subprocess.run([sys.executable, "-m", "triforce_rt", "generate", "--prompt-file", str(prompt),
                        "--max-new-tokens", "8", "--ignore-eos", "--json"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["new_tokens"] == 8


def test_readme_mode_table_is_the_modes_table():
    """The README's table of modes is settings.MODES, row for row."""
    from triforce_rt.settings import MODES

    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    rows = re.findall(r"^\| `([a-z][a-z-]*)` \| (.+) \|$", readme, flags=re.M)
    assert rows == [(m, spec.help) for m, spec in MODES.items()]


def test_bad_model_files_are_one_line_naming_the_file(capsys, tiny_folder, tmp_path):
    """A corrupt config.json, a truncated safetensors file, a text file or a cut GGUF named .gguf, a lone .bin
    file, a pickle that runs code (even with --allow-pickle) and a model that needs remote code: one line each,
    exit 2, naming the file."""
    import pickle
    import shutil

    from triforce_rt.models.loader import default_gguf

    def folder(name, change):
        d = tmp_path / name
        shutil.copytree(tiny_folder, d)
        change(d)
        return str(d)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    def evil(d):
        (d / "model.safetensors").unlink()
        with open(d / "pytorch_model.bin", "wb") as f:
            pickle.dump({"x": Evil()}, f)

    def remote(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(model_type="custom-thing", auto_map={"AutoConfig": "custom.CustomConfig"})
        (d / "config.json").write_text(json.dumps(cfg))

    (tmp_path / "text.gguf").write_text("not a model\n" * 10)
    (tmp_path / "cut.gguf").write_bytes(open(default_gguf(), "rb").read(1 << 20))
    (tmp_path / "lone.bin").write_bytes(b"\0" * 10)
    cases = [
        (folder("badcfg", lambda d: (d / "config.json").write_text('{"model_type": "llama", ')), [], "config.json"),
        (folder("cut", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:999])),
         [], "a weights file cannot be read"),
        (str(tmp_path / "text.gguf"), [], "not a readable GGUF file"),
        (str(tmp_path / "cut.gguf"), [], "not a readable GGUF file"),
        (str(tmp_path / "lone.bin"), [], "is neither a .gguf file nor a folder with config.json"),
        (folder("evil", evil), ["--allow-pickle"], "pickle checkpoint was refused"),
        (folder("remote", remote), [], "--trust-remote-code"),
    ]
    for model, extra, needle in cases:
        rc, _, err = run_cli(capsys, "generate", "--model", model, "--prompt", "hi", *extra)
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, (model, err)
    assert not (tmp_path / "pwned").exists()
