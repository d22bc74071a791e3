"""Durable JSONL records: each append is one whole line, flushed and fsynced before the next record starts.

A process killed mid-write leaves at most one torn last line (no newline); read_records() cuts it off, so a
resumed job rewrites that record and never duplicates or loses a finished one.
"""
import json
import os


def read_records(path: str) -> list:
    """The complete records of path ([] if it does not exist), after truncating a torn last line."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    records = []
    for i, line in enumerate(data[:end].splitlines()):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {i + 1} is not JSON ({e.msg})") from None
    return records


def append_record(f, record: dict) -> None:
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())
