"""Rebuild triforce_rt/distill/corpus.tar.xz, the distillation corpus the package ships, from the machine it was first
read from: Python 3.11.7's standard library (sysconfig's stdlib), Debian 12's /usr/share/common-licenses and
Debian's python3.11-doc HTML. Files under 1 KiB and site-packages are left out; a symlink is stored as the file it
names. Members are sorted and stamped with mtime 0, so the same files give the same archive.

    apt-get install python3.11-doc && python benchmarks/corpus_archive.py [OUT]
"""
import glob
import io
import os
import sys
import sysconfig
import tarfile

ROOTS = {"stdlib": (sysconfig.get_paths()["stdlib"], "**/*.py"), "licenses": ("/usr/share/common-licenses", "*"),
         "docs": ("/usr/share/doc/python3.11-doc/html", "**/*.html")}
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "triforce_rt", "distill", "corpus.tar.xz")


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else OUT
    members = {}
    for source, (root, pattern) in ROOTS.items():
        paths = glob.glob(os.path.join(root, pattern), recursive=True)
        if not paths:
            sys.exit(f"no files under {root}")
        for path in paths:
            rel = os.path.relpath(path, root)
            if "site-packages" not in rel and os.path.isfile(path) and os.path.getsize(path) >= 1024:
                with open(path, "rb") as f:
                    members[f"{source}/{rel}"] = f.read()
    with tarfile.open(out, "w:xz", preset=9) as tf:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(members[name]), 0o644
            tf.addfile(info, io.BytesIO(members[name]))
    print(f"{out}: {len(members)} files, {sum(map(len, members.values())) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
