"""`triforce batch --workers N`: a real local Ray cluster, real model replicas, real kills."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import tiny_with_smol_tokenizer
from test_jobs import run, write_input

from triforce_rt.jsonl import read_records

pytest.importorskip("ray", reason="Ray is the optional extra triforce-rt[ray] (make setup installs it)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol):
    return tiny_with_smol_tokenizer(tmp_path_factory, smol, 512)


def test_bad_worker_settings_are_one_line(capsys, tiny, tmp_path, monkeypatch):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, 2)
    base = ["batch", str(src), "--out", str(out), "--model", tiny, "--mode", "ar"]
    rc, _, err = run(capsys, *base, "--workers", "0")
    assert rc == 2 and "--workers must be at least 1 (got 0)" in err and len(err.strip().splitlines()) == 1, err
    t0 = time.perf_counter()
    rc, _, err = run(capsys, *base, "--workers", "1", "--ray-address", "127.0.0.1:9")  # nothing listens on port 9
    assert rc == 2 and "cannot reach the Ray cluster at 127.0.0.1:9" in err and len(err.strip().splitlines()) == 1
    assert time.perf_counter() - t0 < 10
    rc, _, err = run(capsys, *base[:-4], "--model", str(tmp_path / "nope"), "--workers", "2")
    assert rc == 2 and "model not found" in err and len(err.strip().splitlines()) == 1, err  # before Ray starts
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    rc, _, err = run(capsys, *base, "--workers", "2")
    assert rc == 2 and "pip install 'triforce-rt[ray]'" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def workers_of(driver: int) -> list:
    """pids of the BatchWorker actors of the Ray cluster that the driver process started (its raylet's children)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{parent}/stat") as f:
                grand = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if cmd.startswith(b"ray::BatchWorker") and grand == driver:
            found.append(int(pid))
    return found


def wait_for(cond, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_worker_and_killed_driver_lose_and_duplicate_nothing(tiny, tmp_path):
    """Two replicas on a local Ray cluster. (1) One is SIGKILLed after the first record: its lines go to the other
    and the job ends with every id once. (2) The driver's whole process group (driver and cluster) is SIGKILLed
    mid-job; the same command run again resumes: every id once."""
    src = tmp_path / "in.jsonl"
    write_input(src, 24, vary=False)
    for case in ("worker", "driver"):
        out = tmp_path / f"out-{case}.jsonl"
        cmd = [sys.executable, "-m", "triforce_rt", "batch", str(src), "--out", str(out), "--model", tiny,
               "--mode", "ar", "--ignore-eos", "--max-new-tokens", "100", "--workers", "2", "--threads", "1",
               "--quiet"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            victims = wait_for(lambda: len(workers_of(proc.pid)) == 2 and workers_of(proc.pid), 120, "two workers")
            wait_for(lambda: out.exists() and out.read_bytes().count(b"\n") >= 1, 120, "a first record")
            if case == "worker":
                os.kill(victims[0], signal.SIGKILL)
                assert out.read_bytes().count(b"\n") < 24, "the kill must land mid-job"
                _, err = proc.communicate(timeout=300)
                assert proc.returncode == 0, err.decode()
                assert len(workers_of(proc.pid)) == 0
            else:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                first = out.read_bytes().count(b"\n")
                assert 1 <= first < 24, "the kill must land mid-job"
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        ids = [r["id"] for r in read_records(str(out))]
        assert sorted(ids) == sorted(f"r{i}" for i in range(24)), case
        assert all(json.loads(line)["new_tokens"] == 100 for line in out.read_text().splitlines())
