"""Speculative over-fetch at real locality: how many pages a corrected head still recalls on the critical path.

At real locality most correction checks fire (``fidelity/locality.py``: 83% of SmolLM2's (layer, KV head,
step) checks at the default threshold 0.9), and each corrected head recalls the pages of its new top-k
that are not resident, before attention. Over-fetch keeps more pages resident than the budget: the
speculative selection (previous query, off the critical path) fetches its top ``k + m`` pages, so a
corrected selection (current query, top ``k``) finds more of its pages already there.

``python -m freekv_sglang.fidelity.overfetch`` replays the teacher-forced decode positions of the fidelity
texts, per (layer, KV head) with Quest scores and GQA mean as the runtime scores them, and counts for each
margin ``m`` (pages):

* ``critical`` -- pages of the corrected selection ``topk(s_t, k)`` outside the speculated set
  ``topk(s'_t, k + m)``, where ``s'_t`` scores step ``t``'s candidates with the previous query (as the
  runtime's speculation does after step ``t - 1``'s attention), per corrected (layer, KV head, step); what crosses PCIe on the critical path;
* ``any_critical`` -- share of corrected (layer, KV head, step) with at least one such page (a head with
  none needs no recall at all);
* ``speculative`` -- pages of ``topk(s'_t, k + m)`` outside ``topk(s'_{t-1}, k + m)``, per (layer, KV head,
  step): the off-critical-path traffic the margin costs.

The resident set is idealised as exactly the speculated set (the runtime's resident set also keeps the
corrected pages of the previous step); the selection the attention reads is unchanged (``topk(s_t, k)`` on
corrected steps, ``topk(s'_t, k)`` on kept ones), so over-fetch changes traffic, not accuracy.
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch

from ..algorithm import WorkingSetLayout, aggregate_gqa, query_similarity, quest_scores, topk_pages
from ..algorithm.digests import page_digests
from ..provenance import command_line, commit_id, write_json
from .locality import DEFAULT_TAU, PAGE_SIZE, SINK, WINDOW, _csv, add_replay_args, capture_qk

MARGINS = (0, 2, 4, 8, 16, 32)  # pages fetched beyond the budget by speculation
DEFAULT_BUDGET = 1024


def _outside(sel: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Pages of ``sel`` ``[..., a]`` (-1 padded) not in ``ref`` ``[..., b]``: int64 ``[...]``."""
    hit = (sel[..., :, None] == ref[..., None, :]).any(-1)
    return ((sel >= 0) & ~hit).sum(-1)


def replay_layer(q: torch.Tensor, k: torch.Tensor, start: int, n_kv_heads: int, budget: int = DEFAULT_BUDGET,
                 margins=MARGINS, page_size: int = PAGE_SIZE, sink: int = SINK, window: int = WINDOW,
                 tau: float = DEFAULT_TAU, chunk: int = 128) -> dict:
    """Counts for one layer over decode positions ``start .. len(q) - 1`` (context ``i + 1`` at position ``i``).

    Args:
        q: ``[n, Hq, D]`` post-RoPE queries; k: ``[n, Hkv, D]`` post-RoPE keys (float32).
    Returns:
        ``{"corrected": bool [T, Hkv], "critical": {m: int64 [T, Hkv]}, "speculative": {m: int64 [T, Hkv]}}``
        for positions ``start + 2 ..`` (each needs the previous step's speculated set).
    """
    n_tok, _, d = q.shape
    if not 0 < start < n_tok - 1:
        raise ValueError(f"start {start} must leave at least two decode positions of the {n_tok}")
    digests = page_digests(k, page_size)
    n_pages = digests.shape[0]
    lay = WorkingSetLayout.from_tokens(page_size, sink, budget, window)
    kk = lay.n_select
    pos = torch.arange(start + 1, n_tok)  # steps with a previous query
    sel_k, sel_km = [], {m: [] for m in margins}
    for c0 in range(0, len(pos), chunk):
        p = pos[c0: c0 + chunk]
        cand = lay.candidate_mask(p + 1, n_pages)
        dig = digests[None].expand(len(p), -1, -1, -1, -1)
        cur = aggregate_gqa(quest_scores(q[p], dig), n_kv_heads, "mean", cand, head_dim=d)
        # speculation: the previous step's query over this step's candidates
        prev = aggregate_gqa(quest_scores(q[p - 1], dig), n_kv_heads, "mean", cand, head_dim=d)
        sel_k.append(topk_pages(cur, kk))
        for m in margins:
            sel_km[m].append(topk_pages(prev, kk + m))
    top_k = torch.cat(sel_k)  # [T, Hkv, k]
    sim = query_similarity(q[pos[1:]], q[pos[1:] - 1], n_kv_heads)
    out = {"corrected": sim < tau, "critical": {}, "speculative": {}}
    for m in margins:
        spec = torch.cat(sel_km[m])  # [T, Hkv, k + m] the set speculated for each step
        out["critical"][m] = _outside(top_k[1:], spec[1:])
        out["speculative"][m] = _outside(spec[1:], spec[:-1])
    return out


def summarize(layers: list[dict], budget_pages: int, margins=MARGINS) -> list[dict]:
    """One line per margin, pooled over layers, KV heads and steps."""
    corr = torch.cat([l["corrected"].flatten() for l in layers])
    rows = []
    for m in margins:
        crit = torch.cat([l["critical"][m].flatten() for l in layers])
        spec = torch.cat([l["speculative"][m].flatten() for l in layers])
        c = crit[corr].double()
        rows.append({
            "margin_pages": m, "resident_pages": budget_pages + m,
            "critical_pages_per_corrected": round(float(c.mean()), 3),
            "critical_pages_per_check": round(float(c.sum() / corr.numel()), 3),
            "any_critical": round(float((c > 0).double().mean()), 4),
            "speculative_pages_per_check": round(float(spec.double().mean()), 3),
        })
    return rows


def table(rows: list[dict]) -> str:
    head = ["margin m (pages)", "resident pages", "critical-path pages per corrected head",
            "corrected heads with any", "critical-path pages per check", "speculative pages per check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rows:
        lines.append(f"| {r['margin_pages']} | {r['resident_pages']} | {r['critical_pages_per_corrected']:.2f} | "
                     f"{100 * r['any_critical']:.1f}% | {r['critical_pages_per_check']:.2f} | "
                     f"{r['speculative_pages_per_check']:.2f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m freekv_sglang.fidelity.overfetch", description=__doc__.splitlines()[0])
    add_replay_args(p)
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="selected tokens per KV head")
    p.add_argument("--margins", default=",".join(map(str, MARGINS)), help="over-fetch margins in pages, comma list")
    p.add_argument("--tau", type=float, default=DEFAULT_TAU, help="correction threshold")
    p.add_argument("--page-size", type=int, default=PAGE_SIZE)
    p.add_argument("--sink", type=int, default=SINK)
    p.add_argument("--window", type=int, default=WINDOW)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the result here")
    return p.parse_args(argv)


def main(argv=None, log=print) -> dict:
    from . import model as model_mod
    from . import texts as texts_mod

    args = parse_args(argv)
    margins = _csv(args.margins, int)
    t0 = time.time()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lm = model_mod.load(args.model, args.cache_dir, threads=args.threads, log=log)
    n_kv = lm.model.config.num_key_value_heads
    layers, info = [], {}
    with torch.inference_mode():
        for name in _csv(args.texts):
            ids = lm.tokenizer(texts_mod.get_text(name).text).input_ids[: args.max_tokens]
            qs, ks = capture_qk(lm.model, ids)
            layers += [replay_layer(q, k, args.prefill, n_kv, args.budget, margins, args.page_size, args.sink,
                                    args.window, args.tau) for q, k in zip(qs, ks)]
            info[name] = {"tokens": len(ids), "decode_steps": len(ids) - args.prefill}
            log(f"{name}: {len(ids)} tokens replayed ({time.time() - t0:.0f} s)")
    lay = WorkingSetLayout.from_tokens(args.page_size, args.sink, args.budget, args.window)
    rows = summarize(layers, lay.n_select, margins)
    corr = torch.cat([l["corrected"].flatten() for l in layers])
    out = {
        "meta": {"command": command_line("freekv_sglang.fidelity.overfetch", argv),
                 "commit": commit_id(), "started (UTC)": started, "wall time": f"{time.time() - t0:.0f} s",
                 "model": lm.name, "budget_tokens": args.budget, "budget_pages": lay.n_select, "tau": args.tau,
                 "page_size": args.page_size, "sink": args.sink, "window": args.window, "prefill": args.prefill,
                 "texts": info, "correction_rate": round(float(corr.double().mean()), 4)},
        "margins": rows,
    }
    log(table(rows))
    log(f"correction rate at {args.tau:g}: {100 * out['meta']['correction_rate']:.1f}%")
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
