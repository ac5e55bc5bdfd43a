#!/usr/bin/env python
"""PNG plots of the benchmark JSON files (runs anywhere with matplotlib; no GPU).

* ``bench_decode.json`` (``launch/bench_decode.py``): output tokens/s vs batch size, one line per
  mode, one panel per context length.
* ``profile.json`` (``launch/profile_decode_step.py``): GPU µs per layer vs consecutive-query
  cosine, one line per variant plus dense FlashInfer decode, one panel per batch size.

Usage: ``python launch/plot_bench.py --decode docs/data/bench_decode-....json --out docs/bench_decode.png``
       ``python launch/plot_bench.py --profile docs/data/profile_decode_step-....json --out docs/profile.png``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(groups: dict, title, xlabel: str, ylabel: str, suptitle: str, out: str, *, logx=False, hline=None):
    """One panel per key of ``groups`` (``{panel: {line: [(x, y)]}}``), lines sorted by name."""
    plt = _plt()
    keys = sorted(groups)
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    names = sorted({name for g in groups.values() for name in g})
    color = {name: f"C{i % 10}" for i, name in enumerate(names)}  # one colour per line in every panel
    for ax, key in zip(axes[0], keys):
        for name, pts in sorted(groups[key].items()):
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, color=color[name])
        if hline is not None and hline(key) is not None:
            y, label = hline(key)
            ax.axhline(y, color="k", linestyle="--", label=label)
        ax.set_title(title(key))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logx:
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    import textwrap

    fig.suptitle("\n".join(textwrap.wrap(suptitle, 40 * len(keys) + 20)), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_decode(data: dict, out: str) -> None:
    """Tokens/s vs batch, per context; a mode missing a cell is left out of that point."""
    by_ctx = defaultdict(lambda: defaultdict(list))  # ctx -> mode -> [(bs, tok/s)]
    for mode, rows in data["results"].items():
        for r in rows:
            ms = r.get("median_decode_latency")
            if ms:
                by_ctx[r["input_len"]][mode].append((r["batch_size"], r["batch_size"] / ms))
    if not by_ctx:
        raise ValueError("no decode results in the file")
    loc = data.get("args", {}).get("query_cosine")
    note = "random-weight queries" if loc is None else f"synthetic query cosine {loc}"
    _panels(by_ctx, lambda c: f"context {c} tokens", "batch size", "output tokens/s (decode)",
            f"{data.get('card', '?')}, {os.path.basename(str(data.get('args', {}).get('model', '?')).rstrip('/'))}, "
            f"{note}", out, logx=True)


def plot_profile(data: dict, out: str) -> None:
    """µs per layer vs query cosine, per batch size, with dense FlashInfer as a dashed line."""
    by_bs = defaultdict(lambda: defaultdict(list))  # bs -> variant -> [(cos, us)]
    for r in data["rows"]:
        by_bs[r["bs"]][r["variant"]].append((r["similarity"], 1e3 * r["ms_per_layer"]))
    if not by_bs:
        raise ValueError("no rows in the file")

    def dense(bs):
        ms = data.get("dense", {}).get(f"bs{bs}_page32")
        return None if ms is None else (1e3 * ms, "dense FlashInfer, full context")

    ctx = data.get("args", {}).get("context", "?")
    _panels(by_bs, lambda b: f"batch {b}", "consecutive-query cosine", "GPU µs per layer",
            f"{data.get('device', '?')}: FreeKV decode step per layer, {ctx}-token contexts", out, hline=dense)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--decode", help="bench_decode.json")
    src.add_argument("--profile", help="profile_decode_step JSON")
    ap.add_argument("--out", required=True, help="PNG path")
    a = ap.parse_args(argv)
    with open(a.decode or a.profile) as f:
        data = json.load(f)
    (plot_decode if a.decode else plot_profile)(data, a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
