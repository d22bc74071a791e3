"""The distillation corpus: real text shipped with the package, the same on every machine, split by file into train
and held-out parts.

corpus.tar.xz (8 MB, 83 MB unpacked) holds SOURCE/PATH members: the Python 3.11.7 standard library sources
(stdlib/), Debian 12's common-licenses texts (licenses/) and the Python 3.11 docs of Debian's python3.11-doc
3.11.2-6+deb12u9 (docs/, HTML whose tags read() strips); files under 1 KiB and site-packages left out.
`python benchmarks/corpus_archive.py` rebuilds it. A file is held out when crc32(its name) % 20 == 0.
"""
import functools
import hashlib
import html
import os
import random
import re
import tarfile
import tempfile
import zlib
from bisect import bisect
from itertools import accumulate

import numpy as np

ARCHIVE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.tar.xz")
SOURCES = ("stdlib", "licenses", "docs")


@functools.cache
def members() -> dict:
    """{'SOURCE/PATH': bytes} of every file in the archive (0.7 s, 83 MB, once per process)."""
    with tarfile.open(ARCHIVE) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


def files(part: str) -> list:
    """Sorted (source, name) pairs of one part, 'train' or 'heldout'; source by source in SOURCES order."""
    names = members()
    return [(name.split("/", 1)[0], name) for source in SOURCES
            for name in sorted(n for n in names if n.startswith(source + "/"))
            if (zlib.crc32(name.encode()) % 20 == 0) == (part == "heldout")]


def fingerprint(part: str) -> str:
    """sha256 of one part's file names and contents: teacher data cached for other text is not reused."""
    h = hashlib.sha256()
    for _, name in files(part):
        data = members()[name]
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]


def strip_html(text: str) -> str:
    """The body text of an HTML page."""
    text = re.sub(r"(?s)<(script|style|head)\b.*?</\1>|<[^>]+>", "", text)
    return re.sub(r"\n\s*\n+", "\n\n", html.unescape(text))


def read(source: str, name: str) -> str:
    text = members()[name].decode("utf-8", errors="replace")
    return strip_html(text) if source == "docs" else text


def path(name: str) -> str:
    """A file on disk holding member `name` ('licenses/Apache-2.0'), written once under the model cache: for a
    document given by path (make demo, an experiment's {stdlib}/{licenses}/{docs} prompt)."""
    from ..errors import UserError
    from ..models.loader import cache_root, stamp

    if name not in members():
        raise UserError(f"no file '{name}' in the shipped corpus")
    out = os.path.join(cache_root(), "corpus-{}-{}".format(*stamp(ARCHIVE)), name)
    if not os.path.isfile(out):
        try:
            os.makedirs(os.path.dirname(out), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out))
            with os.fdopen(fd, "wb") as f:
                f.write(members()[name])
            os.replace(tmp, out)
        except OSError as e:
            raise UserError(f"cannot write the corpus file {out} ({e.strerror}); set TRIFORCE_CACHE to a writable "
                            "folder") from None
    return out


def is_code(source: str) -> bool:
    return source == "stdlib"


DRAWS = ("file", "length")
_IDS = {}  # (tokenizer, sha1 of a file's bytes) -> its token ids (int32): each text is tokenized once per process


def tokenizer_key(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    return hashlib.sha1(backend.to_str().encode()).hexdigest() if backend else f"id:{id(tok)}"


def tokenize(tok, key: str, items: list) -> list:
    """Token ids (np.int32) of corpus files [(source, name)]; the ones not seen yet in one batch (a fast tokenizer
    encodes it on every core: 8 s for the 11.8M training tokens on 2 cores, 16 s file by file)."""
    digests = [(key, hashlib.sha1(members()[name]).digest()) for _, name in items]
    todo = {d: item for d, item in zip(digests, items) if d not in _IDS}
    texts = [read(*item) for item in todo.values()]
    backend = getattr(tok, "backend_tokenizer", None)
    ids = ([e.ids for e in backend.encode_batch(texts, add_special_tokens=False)] if backend else
           [tok.encode(t, add_special_tokens=False) for t in texts])
    _IDS.update((d, np.asarray(i, dtype=np.int32)) for d, i in zip(todo, ids))
    return [_IDS[d] for d in digests]


class Documents:
    """Tokenized documents of one part, drawn in a seeded order; each file is tokenized once, when first needed.
    draw 'file': every file is equally likely, so a short file's text recurs far more often than a long one's;
    'length': a file's chance is its number of tokens, so every token of the corpus is about equally likely."""

    def __init__(self, tokenizer, part: str, seed: int, draw: str):
        self.tok, self.files = tokenizer, files(part)
        if not self.files:
            raise ValueError(f"no {part} text in the corpus")
        if draw not in DRAWS:
            raise ValueError(f"draw must be one of {', '.join(DRAWS)}, not {draw!r}")
        self.rng, self.by_length = random.Random(seed), draw == "length"
        self.key, self.cache, self.pools = tokenizer_key(tokenizer), {}, {}

    def ids(self, source: str, name: str) -> np.ndarray:
        if name not in self.cache:
            self.cache[name] = tokenize(self.tok, self.key, [(source, name)])[0]
        return self.cache[name]

    def pool(self, code: bool | None) -> tuple:
        """The files to draw from (code, prose or either) and, for draw 'length', their cumulative token counts."""
        if code not in self.pools:
            pool = self.files if code is None else [f for f in self.files if is_code(f[0]) == code] or self.files
            if self.by_length:
                self.cache.update((f[1], ids) for f, ids in zip(pool, tokenize(self.tok, self.key, pool)))
            self.pools[code] = pool, list(accumulate(len(self.ids(*f)) for f in pool)) if self.by_length else None
        return self.pools[code]

    def draw(self, n_tokens: int, code: bool | None = None) -> tuple:
        """(source, token ids) of a random document (code, prose or either) with at least n_tokens tokens, cut at a
        random offset."""
        pool, cum = self.pool(code)
        for _ in range(10_000):
            i = bisect(cum, self.rng.random() * cum[-1]) if self.by_length else self.rng.randrange(len(pool))
            source, name = pool[i]
            ids = self.ids(source, name)
            if len(ids) >= n_tokens:
                start = self.rng.randrange(len(ids) - n_tokens + 1)
                return source, ids[start : start + n_tokens].tolist()
        raise ValueError(f"no document of {n_tokens} tokens in the corpus")
