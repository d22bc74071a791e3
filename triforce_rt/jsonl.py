"""Durable JSONL records: each append is one whole line, flushed and fsynced before the next record starts.

A process killed mid-write leaves at most one torn last line (no newline); read_records() cuts it off, so a
resumed job rewrites that record and never duplicates or loses a finished one.
"""
import json
import os

from .errors import UserError


def read_records(path: str, key: str | None = None) -> list:
    """The complete records of path ([] if it does not exist), after truncating a torn last line. key: a field every
    record of this tool's output has ("id" for batch). Nothing is truncated unless every complete line is such a
    record and the torn tail starts as one: a file this tool did not write is refused, never cut."""
    if not os.path.exists(path):
        return []
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a file")
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
    records = []
    for i, line in enumerate(data[:end].splitlines()):
        if line.strip():
            try:
                records.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: line {i + 1} is not JSON ({getattr(e, 'msg', e)}); not this tool's output"
                                 ) from None
            if not isinstance(records[-1], dict) or (key and key not in records[-1]):
                raise ValueError(f"{path}: line {i + 1} is not a record of this tool (no '{key}')")
    if end < len(data):
        if not data[end:].startswith(b'{"'):
            raise ValueError(f"{path}: its last line is not a record of this tool")
        with open(path, "r+b") as f:
            f.truncate(end)
    return records


def drop_records(path: str, key: str, values: set) -> None:
    """Rewrite path without the records whose key is in values: a new file, fsynced, then renamed over the old one,
    so a kill leaves either file whole."""
    keep = [r for r in read_records(path, key) if str(r[key]) not in values]
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in keep:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def output_folder(path: str, what: str) -> str:
    """path, created if need be and writable; a one-line error (naming the flag `what`) otherwise."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what} {path}: cannot create that folder ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"{what} {path} cannot be written")
    return path


def check_output(path: str, inputs: list) -> None:
    """An output path that can be written and is none of the inputs (compared by resolved path), checked before
    anything loads or is written."""
    real = os.path.realpath(path)
    if any(os.path.realpath(p) == real for p in inputs):
        raise UserError(f"--out {path} is also an input: choose another file")
    if os.path.isdir(path):
        raise UserError(f"--out {path} is a directory")
    folder = os.path.dirname(real)
    if not os.path.isdir(folder):
        raise UserError(f"--out {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UserError(f"--out {path} cannot be written")


def append_record(f, record: dict) -> None:
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())
