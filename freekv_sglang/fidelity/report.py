"""Summaries of a run: one line per (mode, budget), as a text table, JSON and Markdown."""

from __future__ import annotations

import math

COLUMNS = [
    ("mode", "mode"), ("budget", "budget"), ("top1", "top-1 agree"), ("kl", "KL(dense‖mode)"),
    ("ppl_ratio", "ppl ratio"), ("divergence", "1st divergence"), ("passkey", "passkey acc"),
    ("needle", "needle (of dense's)"), ("needle_answered", "needle answered"),
    ("correction_rate", "corrected heads"), ("recalled_per_layer_step", "recalled/layer-step"),
    ("recalled_per_step", "recalled/step"),
]


def _ratio(num, den):
    return num / den if den else None


def summarize(rows, results: dict) -> list[dict]:
    """Pool every task's per-row numbers into one summary per row.

    Teacher-forced metrics are pooled over texts weighted by steps (the ppl ratio is
    ``exp(sum(nll_mode - nll_dense) / sum(steps))``); the divergence is the mean over greedy
    prompts; retrieval statistics pool teacher-forced and greedy decoding.
    """
    out = []
    tf = list(results.get("teacher_forced", {}).values())
    gr = list(results.get("greedy", {}).values())
    pk = results.get("passkey")
    nd = results.get("needle")
    for r, row in enumerate(rows):
        s = {"mode": row.mode_name, "budget": row.budget, "label": row.label,
             "working_set_tokens": row.working_set_tokens}
        if tf:
            steps = sum(t["rows"][r]["steps"] for t in tf)
            s["top1"] = sum(t["rows"][r]["top1_agreement"] * t["rows"][r]["steps"] for t in tf) / steps
            s["kl"] = sum(t["rows"][r]["kl_mean"] * t["rows"][r]["steps"] for t in tf) / steps
            dn = sum((t["rows"][r]["nll_mean"] - t["rows"][0]["nll_mean"]) * t["rows"][r]["steps"] for t in tf)
            s["ppl_ratio"] = math.exp(dn / steps)
            s["teacher_forced_steps"] = steps
        if gr:
            s["divergence"] = sum(g["rows"][r]["divergence"] for g in gr) / len(gr)
        if pk:
            s["passkey"] = pk["rows"][r]["passkey_accuracy"]
        if nd:
            s["needle"] = nd["rows"][r]["needle_of_dense"]
            s["needle_answered"] = f"{nd['rows'][r]['needle_answered']}/{len(nd['cases'])}"
        seqs = [t["rows"][r] for t in tf + gr]
        if row.mode != "dense" and seqs:
            s["correction_rate"] = _ratio(sum(x["corrected"] for x in seqs), sum(x["head_steps"] for x in seqs))
            s["recalled_per_layer_step"] = _ratio(sum(x["recalled"] for x in seqs), sum(x["layer_steps"] for x in seqs))
            s["recalled_per_step"] = _ratio(sum(x["recalled"] for x in seqs), sum(x["retrieval_steps"] for x in seqs))
        out.append(s)
    return out


def _fmt(key, v):
    if v is None:
        return "-"
    if key in ("top1", "passkey", "correction_rate", "needle"):
        return f"{100 * v:.2f}%"
    if key == "kl":
        return f"{v:.4f}"
    if key == "ppl_ratio":
        return f"{v:.4f}"
    if key in ("recalled_per_layer_step", "recalled_per_step", "divergence"):
        return f"{v:.1f}"
    return str(v)


def table(summary: list[dict], markdown: bool = False) -> str:
    cols = [(k, h) for k, h in COLUMNS if any(k in s for s in summary)]
    cells = [[h for _, h in cols]] + [[_fmt(k, s.get(k)) for k, _ in cols] for s in summary]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells[1:]]
        return "\n".join(lines)
    w = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c[i].rjust(w[i]) for i in range(len(cols))) for c in cells]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def needle_hits_table(needle: dict) -> str:
    """Markdown: per scoring rule, the share of (answer step, layer, KV head) retrieving triples whose needle
    page is in the top ``k`` candidates, per budget (see :mod:`.needle`)."""
    hits = needle.get("needle_hits", {})
    if not hits:
        return ""
    budgets = list(next(iter(hits.values()))["in_top"])
    lines = ["| rule / GQA aggregation | retrieving heads | " + " | ".join(f"needle in top {b} tokens" for b in budgets)
             + " |", "|---|---:|" + "---:|" * len(budgets)]
    for label, h in hits.items():
        n = h["retrieving"]
        cells = [f"{100 * h['in_top'][b] / n:.1f}%" if n else "-" for b in budgets]
        lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_text_table(rows, results: dict, markdown: bool = True) -> str:
    """Teacher-forced numbers per text: top-1 / KL / ppl ratio."""
    tf = results.get("teacher_forced", {})
    if not tf:
        return ""
    names = list(tf)
    head = ["mode", "budget"] + [f"{n}: top-1 / KL / ppl ratio" for n in names]
    body = []
    for r, row in enumerate(rows):
        cells = [row.mode_name, str(row.budget) if row.budget else "-"]
        for n in names:
            x = tf[n]["rows"][r]
            cells.append(f"{100 * x['top1_agreement']:.2f}% / {x['kl_mean']:.4f} / {x['ppl_ratio']:.4f}")
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])
    return "\n".join(["  ".join(head)] + ["  ".join(c) for c in body])


def markdown_report(meta: dict, rows, results: dict, summary: list[dict]) -> str:
    lines = ["# FreeKV fidelity run", ""]
    for k, v in meta.items():
        lines.append(f"- **{k}**: {v}")
    lines += ["", "## Summary (all texts pooled)", "", table(summary, markdown=True), ""]
    pt = per_text_table(rows, results)
    if pt:
        lines += ["## Teacher-forced, per text", "", pt, ""]
    gr = results.get("greedy", {})
    if gr:
        names = list(gr)
        lines += ["## Greedy: tokens until the first divergence from dense, per prompt", "",
                  "| mode | budget | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for r, row in enumerate(rows[1:], start=1):
            lines.append(f"| {row.mode_name} | {row.budget} | "
                         + " | ".join(str(gr[n]["rows"][r]["divergence"]) for n in names) + " |")
        lines.append("")
    dv = {n: t.get("dense_vs_full_forward") for n, t in results.get("teacher_forced", {}).items()}
    if any(dv.values()):
        lines += ["## Dense decode vs. one full forward pass (plumbing check)", ""]
        for n, d in dv.items():
            if d:
                lines.append(f"- {n}: top-1 agreement {100 * d['top1_agreement']:.2f}%, "
                             f"max |logit diff| {d['max_abs_logit_diff']:.2e}, mean KL {d['kl_mean']:.2e}")
        lines.append("")
    pk = results.get("passkey")
    if pk:
        lines += ["## Passkey cases", "", "| depth | key | prompt tokens | dense answer | rows correct |", "|---|---|---|---|---|"]
        for c in pk["cases"]:
            ok = sum(c["correct"][1:])
            lines.append(f"| {c['depth']:.2f} | {c['key']} | {c['prompt_tokens']} | {c['dense_answer']!r} | "
                         f"{ok}/{len(c['correct']) - 1} |")
        lines.append("")
    nd = results.get("needle")
    if nd:
        lines += ["## Needle cases", "", "| case | prompt tokens | answer | dense answer | FreeKV rows correct |",
                  "|---|---|---|---|---|"]
        for c in nd["cases"]:
            lines.append(f"| {c['name']} | {c['prompt_tokens']} | {c['answer']} | {c['answers'][0]!r} | "
                         f"{sum(c['correct'][1:])}/{len(c['correct']) - 1} |")
        lines += ["", "## Needle pages of retrieving heads in each rule's top k", "", needle_hits_table(nd), ""]
    return "\n".join(lines)
