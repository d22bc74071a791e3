"""results.jsonl -> results.csv, results.md and plot.png. Speedups are against the `ar` row of the same document,
context, sampling settings and repeat, in the same experiment (one machine, one run)."""
import csv
import os

from ..jsonl import read_records
from ..textio import tier_stats
from .schema import SWEEP

SWEPT_ORDER = tuple(SWEEP)


def acceptance(row: dict) -> dict:
    """{tier name: (accepted / drafted, α)} for each drafting tier of a row (textio.tier_stats)."""
    return {s["name"]: (s["acceptance"], s["alpha"]) for s in map(tier_stats, row.get("tiers", [])[:-1])
            if s["acceptance"] is not None}


def table(rows: list, swept: list, temperature: float) -> list:
    """One flat dict per row, with vs_ar and (greedy rows) identical_to_ar filled from the matching ar row."""
    def ref_key(r):
        return (r["document"], r["key"]["context"], r["key"]["repeat"],
                tuple(r["key"]["params"].get(k) for k in ("temperature", "top_p", "top_k")))

    def greedy(r):  # sampled rows follow the target's law, not ar's exact tokens
        return r["key"]["params"].get("temperature", temperature) <= 0

    ar = {ref_key(r): r for r in rows if r["mode"] == "ar"}
    out = []
    for r in rows:
        ref = ar.get(ref_key(r))
        tok_s = r["decode_tokens_per_second"]
        flat = {"document": r["document"], "context": r["context"], "mode": r["mode"]}
        flat.update({k: r["key"]["params"].get(k, "") for k in swept if k != "context"})
        flat.update(repeat=r["key"]["repeat"], tok_s=round(tok_s, 2),
                    vs_ar=round(tok_s / ref["decode_tokens_per_second"], 2) if ref else "",
                    tok_per_target_call=round(r.get("tokens_per_target_call", 0.0), 2) if r.get("tiers") else "",
                    acceptance="; ".join(f"{n} {a[0]}" for n, a in acceptance(r).items()),
                    alpha="; ".join(f"{n} {a[1]}" for n, a in acceptance(r).items()),
                    identical_to_ar=(r["tokens"] == ref["tokens"]) if ref and greedy(r) else "")
        out.append(flat)
    return out


def write_report(out: str, exp) -> None:
    rows = read_records(os.path.join(out, "results.jsonl"))
    if not rows:
        return
    swept = [k for k in SWEPT_ORDER if k in exp.sweep]
    flat = table(rows, swept, exp.temperature)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(flat[0]))
        w.writeheader()
        w.writerows(flat)
    head = list(flat[0])
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# {exp.name}\n\n{len(flat)} runs; speedup against `ar` on the same prompt in this run.\n\n")
        f.write("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
        for r in flat:
            f.write("| " + " | ".join(str(r[k]) for k in head) + " |\n")
    under_target = [list(acceptance(r).values())[-1][1] if acceptance(r) else None for r in rows]
    plot(os.path.join(out, "plot.png"), flat, under_target, swept, exp.name)


def plot(path: str, flat: list, alphas: list, swept: list, title: str) -> None:
    """Decode tok/s and the per-token acceptance α of the tier under the target, against the swept key with the most values
    (or per mode when nothing is swept); one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = max(swept, key=lambda k: len({r[k] for r in flat}), default=None)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    modes = list(dict.fromkeys(r["mode"] for r in flat))
    for mode in modes:
        pts = sorted((((r[x_key] if x_key else mode), r["tok_s"], a) for r, a in zip(flat, alphas)
                      if r["mode"] == mode and (not x_key or r[x_key] != "")), key=lambda p: (p[0], p[1]))
        if not pts:
            continue
        xs = [p[0] for p in pts]
        style = "o-" if x_key else "o"
        ax1.plot(xs, [p[1] for p in pts], style, label=mode)
        if any(p[2] is not None for p in pts):
            ax2.plot([p[0] for p in pts if p[2] is not None], [p[2] for p in pts if p[2] is not None], style, label=mode)
    ax1.set(xlabel=x_key or "mode", ylabel="decode tok/s", title=title)
    ax2.set(xlabel=x_key or "mode", ylabel="α, per-token acceptance (tier under the target)", ylim=(0, 1.05))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

