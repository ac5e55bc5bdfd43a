"""Summaries of a run: one line per (mode, budget), as a text table, JSON and Markdown."""

from __future__ import annotations

import math

COLUMNS = [
    ("mode", "mode"), ("budget", "budget"), ("top1", "top-1 agree"), ("kl", "KL(dense‖mode)"),
    ("ppl_ratio", "ppl ratio"), ("divergence", "1st divergence"), ("passkey", "passkey acc"),
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
    if key in ("top1", "passkey", "correction_rate"):
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
    return "\n".join(lines)
