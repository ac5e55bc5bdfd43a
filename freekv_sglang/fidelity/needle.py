"""Needle retrieval in natural text (``--tasks needle``) and where the needle's page ranked.

Each case (:func:`~.texts.needle_case`) is a prompt of natural text (the orchard essay and the lighthouse
story, ``data/``) with a fact, several facts or a board of key-value pairs hidden at a depth, ending in a
question and an answer cue. Every row decodes ``n_new`` tokens greedily; a row answers when the answer
string appears in its decoded text. Dense is row 0; FreeKV rows are judged on the cases dense answers.

Diagnostic (for every case dense answers): dense's queries at each answer step are ranked against the
pages of the history under every scoring rule of the rows and under the true attention mass (what the
``exact`` rows select). For each (layer, KV head) where at least ``threshold`` of the attention mass
(mean over the KV head's query heads) lies on the needle's tokens, the best rank of the needle's pages
among the candidates is recorded: at the step of the answer's first token (per head, for the report of a
miss) and, over all the answer's steps, how many such heads have the needle in their top ``k`` (the
selection of a row with that budget, in ``oracle`` mode). The queries are dense's: a FreeKV row's own
queries drift from them in deeper layers once its earlier layers attended to other pages.
"""

from __future__ import annotations

import math

import torch

from ..algorithm import aggregate_gqa
from ..algorithm.scoring_rules import get_rule
from . import texts
from .model import LoadedModel
from .rows import RowSpec
from .tasks import BatchDecoder

THRESHOLD = 0.1  # needle mass that makes a (layer, KV head) a retrieving head


def case_item(kind: str, length: int, depth: float) -> int:
    """Which fact / key a case asks: a function of the case alone (so that runs split over processes ask
    what one run asks); at one length and kind, depths 0.1, 0.3, 0.5, 0.7, 0.9 ask five different facts."""
    return round(10 * depth) + int(length) // 1000 + texts.NEEDLE_KINDS.index(kind)


def cases(tokenizer, kinds, lengths, depths) -> list[texts.NeedleCase]:
    """Every (length, kind, depth), in that order; the item asked is :func:`case_item`."""
    return [texts.needle_case(tokenizer, kind, int(length), float(d), item=case_item(kind, length, d))
            for length in lengths for kind in kinds for d in depths]


def needle_token_positions(tokenizer, case: texts.NeedleCase) -> tuple[list[int], list[int]]:
    """``(ids, positions)``: the prompt's token ids and the positions of the tokens overlapping ``case.spans``."""
    enc = tokenizer(case.prompt, return_offsets_mapping=True)
    pos = [i for i, (a, b) in enumerate(enc.offset_mapping) if any(a < e and b > s for s, e in case.spans)]
    return list(enc.input_ids), pos


def rank_needle(q: torch.Tensor, keys_all: torch.Tensor, n: int, needle_pos: list[int], rules: dict, page_size: int,
                n_sink: int, n_window: int, prefill_tokens: int, fitted: dict) -> dict:
    """Ranks of the needle's pages for one layer at one step.

    Args:
        q: ``[Hq, D]`` query; keys_all: ``[N, Hkv, D]`` the keys of the whole decode, of which the first
        ``n`` are the history at this step (the current token included).
        rules: ``{label: (rule name, GQA aggregation)}``; fitted: per rule name, its context (fitted on the
        first ``prefill_tokens`` keys, as at prefill) and the digests of ``keys_all``'s full pages.
    Returns:
        ``{"mass": [Hkv] needle mass, "rank": {label: [Hkv] best rank (0-based) among candidates, or None
        when no needle page is a candidate}}``; ``label == "exact"`` ranks by the true attention mass.
    """
    keys = keys_all[:n]
    _, hkv, d = keys.shape
    hq = q.shape[0]
    n_pages = math.ceil(n / page_size)
    ws = max(n_pages - n_window, n_sink)
    cand = torch.zeros(n_pages, dtype=torch.bool)
    cand[n_sink:ws] = True
    logits = torch.einsum("kgd,nkd->kgn", q.float().view(hkv, hq // hkv, d), keys.float()) / math.sqrt(d)
    prob = torch.softmax(logits, dim=-1)
    needle_mass = prob[..., needle_pos].sum(-1).mean(1)  # [Hkv]
    pages = sorted({p // page_size for p in needle_pos if cand[p // page_size]})
    out = {"mass": needle_mass.tolist(), "rank": {}}
    prob = torch.nn.functional.pad(prob, (0, n_pages * page_size - n))
    mass = prob.unflatten(-1, (n_pages, page_size)).sum(-1).mean(1)  # [Hkv, Np]
    for label, (rule_name, agg) in {"exact": (None, None), **rules}.items():
        if rule_name is None:
            s = mass
        else:
            rule = get_rule(rule_name)
            if rule_name not in fitted:  # context and digests of every page that is full at the last step
                ctx = rule.fit(keys_all[:prefill_tokens])
                fitted[rule_name] = (ctx, rule.digests(keys_all, page_size, ctx))
            ctx, dig = fitted[rule_name]
            dig = dig[: n // page_size]
            dig = torch.cat([dig, dig.new_zeros(n_pages - dig.shape[0], *dig.shape[1:])])
            s = aggregate_gqa(rule.scores(q[None], dig[None], ctx), hkv, agg, cand[None], head_dim=d)[0]
        s = s.masked_fill(~cand, float("-inf"))
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(n_pages).expand(hkv, -1).contiguous())
        out["rank"][label] = [min(int(rank[h, p]) for p in pages) if pages else None for h in range(hkv)]
    return out


def rule_labels(rows: list[RowSpec], extra=()) -> dict:
    """``{label: (rule, aggregation)}`` ranked by the diagnostic: quest with the run's aggregation first, then
    the rows' rules, then ``extra`` (``rule`` or ``rule/aggregation``: ranked without a row of their own)."""
    from ..algorithm import AGGREGATIONS

    base_agg = next((r.gqa_aggregation for r in rows if r.mode != "dense"), rows[0].gqa_aggregation)
    out = {f"quest/{base_agg}": ("quest", base_agg)}
    for r in rows:
        if r.mode not in ("dense", "exact"):
            out.setdefault(f"{r.scoring}/{r.aggregation}", (r.scoring, r.aggregation))
    for e in extra:
        name, _, agg = e.partition("/")
        agg = agg or base_agg
        get_rule(name)  # fails early on an unknown rule
        if agg not in AGGREGATIONS:
            raise ValueError(f"unknown GQA aggregation {agg!r} in {e!r}; choose from {AGGREGATIONS}")
        out.setdefault(f"{name}/{agg}", (name, agg))
    return out


def _answer_steps(tokenizer, gen: list[int], answer: str) -> list[int]:
    """Steps of the dense answer: from its first non-space token to the token that completes ``answer``."""
    first = None
    for s in range(len(gen)):
        text = tokenizer.decode(gen[: s + 1])
        if first is None and text.strip():
            first = s
        if answer in text:
            return list(range(first if first is not None else s, s + 1))
    return []


def run(lm: LoadedModel, rows: list[RowSpec], needle_cases: list[texts.NeedleCase], n_new: int,
        threshold: float = THRESHOLD, extra_rules=(), log=print) -> dict:
    """Greedy answers of every row to every case, and the diagnostics (module docstring); ``extra_rules``
    are ranked by the diagnostic too (:func:`rule_labels`)."""
    tok = lm.tokenizer
    p0 = next((r for r in rows if r.mode != "dense"), rows[0])
    page, n_sink, n_window = p0.page_size, p0.sink_tokens // p0.page_size, p0.window_tokens // p0.page_size
    budgets = sorted({r.budget for r in rows if r.budget})
    labels = rule_labels(rows, extra_rules)
    out_cases = []
    hits = {label: {"retrieving": 0, "in_top": {str(b): 0 for b in budgets}} for label in ["exact", *labels]}
    for c in needle_cases:
        ids, needle_pos = needle_token_positions(tok, c)
        bd = BatchDecoder(lm, rows, ids[:-1], len(ids) + n_new + 1)
        bd.dec.capture = {}
        cur = torch.full((len(rows),), ids[-1], dtype=torch.long)
        gen = []
        for _ in range(n_new):
            cur = bd.step(cur).argmax(-1)
            gen.append(cur)
        gen = torch.stack(gen, dim=1)  # [rows, n_new]
        answers = [tok.decode(gen[r]) for r in range(len(rows))]
        ok = [c.answer in a for a in answers]
        rec = {"name": c.name, "kind": c.kind, "depth": c.depth, "prompt_tokens": len(ids), "answer": c.answer,
               "needle_tokens": [needle_pos[0], needle_pos[-1]] if needle_pos else [],
               "needle_pages": sorted({p // page for p in needle_pos}), "correct": ok, "answers": answers}
        keys = fitted = None
        if ok[0]:
            steps = _answer_steps(tok, gen[0].tolist(), c.answer)
            keys = [layer.keys[0].transpose(0, 1) for layer in bd.cache.layers]  # row 0: [n_total, Hkv, D]
            fitted = [dict() for _ in keys]
            first = []
            for s in steps:
                n = len(ids) + s
                for layer, k in enumerate(keys):
                    q = bd.dec.capture[s][layer]
                    rk = rank_needle(q, k, n, needle_pos, labels, page, n_sink, n_window, len(ids) - 1,
                                     fitted[layer])
                    for h, m in enumerate(rk["mass"]):
                        if m < threshold or rk["rank"]["exact"][h] is None:
                            continue
                        for label, ranks in rk["rank"].items():
                            hits[label]["retrieving"] += 1
                            for b in budgets:
                                hits[label]["in_top"][str(b)] += int(ranks[h] < b // page)
                        if s == steps[0]:
                            first.append({"layer": layer, "kv_head": h, "needle_mass": round(m, 4),
                                          "rank": {label: ranks[h] for label, ranks in rk["rank"].items()}})
            n_cand = max(math.ceil((len(ids) + (steps[0] if steps else 0)) / page) - n_window, n_sink) - n_sink
            rec["diagnostic"] = {"answer_steps": steps, "candidates": n_cand,
                                 "selected_pages": {str(b): b // page for b in budgets}, "first_token_heads": first}
        out_cases.append(rec)
        del bd, keys, fitted  # the rows' KV caches (rows x layers x the context): free before the next prefill
        log(f"    needle {c.name} ({len(ids)} tokens, answer {c.answer!r}): dense {answers[0]!r}; "
            f"{sum(ok[1:])}/{len(ok) - 1} FreeKV rows answer")
        if ok[0] and not all(ok):
            missed = [rows[r].label for r in range(1, len(rows)) if not ok[r]]
            log(f"      missed by {', '.join(missed)}; needle page rank at the answer's first token "
                f"(of {rec['diagnostic']['candidates']} candidates), retrieving (layer, KV head):")
            for e in rec["diagnostic"]["first_token_heads"]:
                log(f"        L{e['layer']:<2d} h{e['kv_head']} mass {e['needle_mass']:.2f}: "
                    + ", ".join(f"{lb} {'-' if v is None else v}" for lb, v in e["rank"].items()))
    return {"cases": out_cases, "n_new": n_new, "threshold": threshold, "rules": labels,
            "needle_hits": hits, "rows": row_summary(out_cases, len(rows))}


def row_summary(out_cases: list[dict], n_rows: int) -> list[dict]:
    """Per row: cases answered, their share, and the share of dense's answered cases that the row answers."""
    n_dense = sum(1 for c in out_cases if c["correct"][0])
    rows_out = []
    for r in range(n_rows):
        answered = sum(1 for c in out_cases if c["correct"][r])
        both = sum(1 for c in out_cases if c["correct"][0] and c["correct"][r])
        rows_out.append({"needle_accuracy": answered / len(out_cases) if out_cases else 0.0,
                         "needle_of_dense": both / n_dense if n_dense else None, "needle_answered": answered})
    return rows_out


def merge(parts: list[dict]) -> dict:
    """One needle result from several runs over the same rows (other cases): cases concatenated, the
    diagnostic counts summed, the per-row numbers recomputed."""
    first = parts[0]
    for p in parts[1:]:
        if (p["n_new"], p["threshold"], p["rules"]) != (first["n_new"], first["threshold"], first["rules"]):
            raise ValueError("needle results differ in tokens generated, threshold or rules; cannot merge")
        if set(p["needle_hits"]) != set(first["needle_hits"]) or any(
                set(p["needle_hits"][k]["in_top"]) != set(h["in_top"]) for k, h in first["needle_hits"].items()):
            raise ValueError("needle results differ in rules or budgets; cannot merge")
    cases = [c for p in parts for c in p["cases"]]
    names = [c["name"] for c in cases]
    if len(set(names)) != len(names):
        raise ValueError("merged needle results share a case")
    hits = {label: {"retrieving": sum(p["needle_hits"][label]["retrieving"] for p in parts),
                    "in_top": {b: sum(p["needle_hits"][label]["in_top"][b] for p in parts) for b in h["in_top"]}}
            for label, h in first["needle_hits"].items()}
    return {**first, "cases": cases, "needle_hits": hits, "rows": row_summary(cases, len(first["rows"]))}
