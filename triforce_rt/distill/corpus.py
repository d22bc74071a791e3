"""The distillation corpus: real text found on every machine, split by file into train and held-out parts.

Sources: the Python standard library sources, Debian's common-licenses texts, and the Python docs when Debian's
python3.11-doc is installed (their HTML, tags stripped). A file is held out when crc32(its name) % 20 == 0.
"""
import glob
import hashlib
import html
import os
import random
import re
import sysconfig
import zlib
from bisect import bisect
from itertools import accumulate

STDLIB = sysconfig.get_paths()["stdlib"]
ROOTS = {"stdlib": (STDLIB, "**/*.py"), "licenses": ("/usr/share/common-licenses", "*"),
         "docs": ("/usr/share/doc/python3.11-doc/html", "**/*.html")}
PACKAGES = {"docs": "python3.11-doc"}  # the Debian package that installs a source not on every machine


def files(part: str) -> list:
    """Sorted (source, path) pairs of one part: 'train' or 'heldout'."""
    out = []
    for source, (root, pattern) in ROOTS.items():
        for path in sorted(glob.glob(os.path.join(root, pattern), recursive=True)):
            rel = os.path.relpath(path, root)
            if "site-packages" in rel or not os.path.isfile(path) or os.path.getsize(path) < 1024:
                continue
            held = zlib.crc32(f"{source}/{rel}".encode()) % 20 == 0
            if held == (part == "heldout"):
                out.append((source, path))
    return out


def fingerprint(part: str) -> str:
    """sha256 of one part's file names and contents (about 80 MB, 0.2 s once cached by the OS): teacher data cached
    for other text (e.g. another python3.11-doc release with as many pages) is not reused."""
    h = hashlib.sha256()
    for source, path in files(part):
        with open(path, "rb") as f:
            data = f.read()
        h.update(f"{source}/{os.path.relpath(path, ROOTS[source][0])}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]


def missing() -> list:
    """The sources that hold no text on this machine: distilling without them gives other data and weights."""
    return [s for s, (root, pattern) in ROOTS.items() if not glob.glob(os.path.join(root, pattern), recursive=True)]


def install_hint(source: str) -> str:
    """' (install Debian's PACKAGE)' for a source a package adds, else ''."""
    return f" (install Debian's {PACKAGES[source]})" if source in PACKAGES else ""


def read(source: str, path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if source == "docs":  # keep the body text of an HTML page
        text = re.sub(r"(?s)<(script|style|head)\b.*?</\1>|<[^>]+>", "", text)
        text = re.sub(r"\n\s*\n+", "\n\n", html.unescape(text))
    return text


def is_code(source: str) -> bool:
    return source == "stdlib"


DRAWS = ("file", "length")


class Documents:
    """Tokenized documents of one part, drawn in a seeded order; each file is tokenized once, when first needed.
    draw 'file': every file is equally likely, so a short file's text recurs far more often than a long one's;
    'length': a file's chance is its number of tokens, so every token of the corpus is about equally likely."""

    def __init__(self, tokenizer, part: str, seed: int, draw: str):
        self.tok, self.files = tokenizer, files(part)
        if not self.files:
            raise ValueError(f"no {part} text found under {', '.join(r for r, _ in ROOTS.values())}")
        if draw not in DRAWS:
            raise ValueError(f"draw must be one of {', '.join(DRAWS)}, not {draw!r}")
        self.rng, self.by_length = random.Random(seed), draw == "length"
        self.cache, self.pools = {}, {}

    def ids(self, source: str, path: str) -> list:
        if path not in self.cache:
            self.cache[path] = self.tok.encode(read(source, path), add_special_tokens=False)
        return self.cache[path]

    def pool(self, code: bool | None) -> tuple:
        """The files to draw from (code, prose or either) and, for draw 'length', their cumulative token counts."""
        if code not in self.pools:
            pool = self.files if code is None else [f for f in self.files if is_code(f[0]) == code] or self.files
            self.pools[code] = pool, list(accumulate(len(self.ids(*f)) for f in pool)) if self.by_length else None
        return self.pools[code]

    def draw(self, n_tokens: int, code: bool | None = None) -> tuple:
        """(source, token ids) of a random document (code, prose or either) with at least n_tokens tokens, cut at a
        random offset."""
        pool, cum = self.pool(code)
        for _ in range(10_000):
            i = bisect(cum, self.rng.random() * cum[-1]) if self.by_length else self.rng.randrange(len(pool))
            source, path = pool[i]
            ids = self.ids(source, path)
            if len(ids) >= n_tokens:
                start = self.rng.randrange(len(ids) - n_tokens + 1)
                return source, ids[start : start + n_tokens]
        raise ValueError(f"no document of {n_tokens} tokens in the corpus")
