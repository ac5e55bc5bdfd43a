"""Does the benchmark's calibrated synthetic locality reproduce the measurement? (CPU, or ``--device cuda``)

Calibrates :class:`freekv_sglang.runtime.synthetic.CalibratedQueries` for a model shape, decodes with its
generator over Gaussian keys (the random-weight model's keys), and compares per layer the correction rate at the
threshold and the share of selected pages that change per step with the measured ones
(``python -m freekv_sglang.fidelity.locality``). Usage (repository root)::

    python launch/check_locality.py --context 32000 --rows 2 --steps 64 --json check.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from freekv_sglang.algorithm import (WorkingSetLayout, aggregate_gqa, changed_pages, query_similarity,  # noqa: E402
                                   topk_pages)
from freekv_sglang.provenance import command_line, commit_id, write_json  # noqa: E402
from freekv_sglang.runtime.synthetic import (DEFAULT_LOCALITIES, STEP_GRID, CalibratedQueries,  # noqa: E402
                                             correction_rate, page_scorer)


def simulate(cq: CalibratedQueries, context: int, steps: int = 64, layers=None, tau: float = 0.9, seed: int = 7,
             rows: int = 1) -> dict:
    """Decode ``steps`` tokens from ``context`` with ``cq``'s generator (its :meth:`~CalibratedQueries.apply`, as
    the runtime calls it) over Gaussian keys, for ``rows`` requests; per (layer, KV head) the correction rate at
    ``tau`` (the runtime's check, :func:`~freekv_sglang.algorithm.correction.query_similarity`) and the share of
    the selected pages (reference selection, current query) that change per step. The first step, which
    has no previous query, is left out. Returns ``{"correction": [L, Hkv], "page_change": [L, Hkv]}`` tensors
    for the layers simulated (all by default) and ``"layers"``."""
    lay = cq.layout
    dev = cq.u.device
    layers = list(range(cq.n_layers)) if layers is None else list(layers)
    hkv, hq, d = cq.n_kv_heads, cq.n_q_heads, cq.head_dim
    g = torch.Generator().manual_seed(seed)
    corr = torch.zeros(len(layers), hkv)
    change = torch.zeros(len(layers), hkv)
    change_corr = torch.zeros(len(layers), hkv)
    row_ids = torch.arange(rows, dtype=torch.int64, device=dev)
    for li, layer in enumerate(layers):
        q_prev = torch.zeros(rows, hq, d, dtype=torch.bfloat16, device=dev)
        flags, chg, cnt = [], [], []
        prev_sel = [None] * rows
        keys = [torch.randn(context + steps + 1, hkv, d, generator=g).to(dev) for _ in range(rows)]
        scorers = [page_scorer(cq.scoring, k, lay) for k in keys]
        for t in range(steps + 1):
            n = torch.full((rows,), context + t, dtype=torch.int64, device=dev)
            q = cq.apply(layer, q_prev, row_ids, n, q_prev)
            if t > 0:
                flags.append(query_similarity(q, q_prev, hkv) < tau)  # [rows, Hkv]
            for r in range(rows):
                score, n_pages = scorers[r]
                agg = aggregate_gqa(score(q[r: r + 1]), hkv, "mean", lay.candidate_mask(n[r: r + 1], n_pages))
                sel = topk_pages(agg, lay.n_select)[0]  # [Hkv, k]
                if prev_sel[r] is not None:
                    chg.append(changed_pages(prev_sel[r], sel).float())
                    cnt.append((sel >= 0).sum(-1).float())
                prev_sel[r] = sel
            q_prev = q
        fl = torch.stack(flags).cpu()  # [T, rows, Hkv]
        corr[li] = fl.float().mean((0, 1))
        share = (torch.stack(chg) / torch.stack(cnt).clamp_min(1)).cpu().view(steps, rows, hkv)  # step-major
        change[li] = share.mean((0, 1))
        change_corr[li] = (share * fl).sum((0, 1)) / fl.sum((0, 1)).clamp_min(1)
    return {"layers": layers, "correction": corr, "page_change": change, "page_change_corrected": change_corr}


def check_table(cq: CalibratedQueries, sim: dict, context: int, tau: float = 0.9) -> tuple[str, dict]:
    """Markdown per simulated layer (KV heads pooled): measured vs generated correction rate and page change."""
    li = torch.tensor(sim["layers"])
    want_c = correction_rate(cq.quant_cpu[li], tau)
    want_p = cq.target_share[li]
    got_c, got_p = sim["correction"], sim["page_change"]
    lines = [f"| layer (measured layer) | corrected @{tau:g}: measured | generated | pages changed: measured | "
             f"generated at {context} |", "|---|---:|---:|---:|---:|"]
    for i, l in enumerate(sim["layers"]):
        lines.append(f"| {l} ({cq.src_layers[l]}) | {100 * float(want_c[i].mean()):.1f}% | "
                     f"{100 * float(got_c[i].mean()):.1f}% | {100 * float(want_p[i].mean()):.1f}% | "
                     f"{100 * float(got_p[i].mean()):.1f}% |")
    # pages recalled by corrected heads (before attention) as a share of all recalled pages
    want_pc = cq.target_share_corrected[li]
    crit_want = float((want_c * want_pc).sum() / (want_p.sum()).clamp_min(1e-9))
    crit_got = float((got_c * sim["page_change_corrected"]).sum() / got_p.sum().clamp_min(1e-9))
    tot = {"correction_measured": float(want_c.mean()), "correction_generated": float(got_c.mean()),
           "page_change_measured": float(want_p.mean()), "page_change_generated": float(got_p.mean()),
           "page_change_corrected_measured": float(want_pc.mean()),
           "page_change_corrected_generated": float(sim["page_change_corrected"].mean()),
           "recalled_by_corrected_heads_measured": crit_want, "recalled_by_corrected_heads_generated": crit_got,
           "max_abs_error_per_layer_correction": float((want_c.mean(1) - got_c.mean(1)).abs().max()),
           "max_abs_error_per_layer_page_change": float((want_p.mean(1) - got_p.mean(1)).abs().max())}
    lines.append(f"| **all** | {100 * tot['correction_measured']:.1f}% | {100 * tot['correction_generated']:.1f}% | "
                 f"{100 * tot['page_change_measured']:.1f}% | {100 * tot['page_change_generated']:.1f}% |")
    return "\n".join(lines), tot


def main(argv=None) -> dict:
    """``python launch/check_locality.py``: calibrate the generator for a model shape and check it against the
    measurement on the CPU (or ``--device cuda``)."""
    p = argparse.ArgumentParser(prog="python launch/check_locality.py", description=main.__doc__.split("\n")[0])
    p.add_argument("--locality", default="calibrated", help="calibrated (the repository's measurement) or a path")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=32)
    p.add_argument("--sink", type=int, default=512)
    p.add_argument("--select", type=int, default=1024)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--context", type=int, default=32000)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--rows", type=int, default=1, help="requests simulated per layer")
    p.add_argument("--check-layers", default="", help="comma list (default: every layer)")
    p.add_argument("--tau", type=float, default=0.9)
    p.add_argument("--page-scoring", default="quest", choices=sorted(DEFAULT_LOCALITIES),
                   help="the runtime's page scoring (and the measurement 'calibrated' stands for)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the calibration and the check here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    lay = WorkingSetLayout.from_tokens(a.page_size, a.sink, a.select, a.window)
    t0 = time.time()
    cq = CalibratedQueries(a.locality, a.layers, a.q_heads, a.kv_heads, a.head_dim, lay, a.context + a.steps + 1,
                           a.device, scoring=a.page_scoring)
    summ = cq.summary(a.tau)
    print(f"calibrated in {time.time() - t0:.0f} s: {json.dumps(summ)}", flush=True)
    layers = [int(x) for x in a.check_layers.split(",") if x.strip()] or None
    t0 = time.time()
    sim = simulate(cq, a.context, a.steps, layers, a.tau, rows=a.rows)
    md, tot = check_table(cq, sim, a.context, a.tau)
    print(md)
    print(f"simulated in {time.time() - t0:.0f} s: {json.dumps({k: round(v, 4) for k, v in tot.items()})}")
    commit = commit_id()
    out = {"command": command_line("launch/check_locality.py", argv),
           "commit": commit, "date": datetime.date.today().isoformat(), "device": a.device,
           "args": vars(a), "calibration": summ, "check": tot, "table": md,
           "kappa": [[[round(float(x), 5) for x in h] for h in l] for l in cq.kappa_cpu.tolist()],
           "contexts": cq.contexts, "curves": [[round(float(x), 4) for x in c] for c in cq.curves],
           "step_grid": list(STEP_GRID)}
    if a.json:
        write_json(a.json, out)
    return out


if __name__ == "__main__":
    main()
