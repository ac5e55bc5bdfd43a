"""Decode and prefill latency of FreeKV vs dense SGLang vs retrieval baselines, in one run.

Each mode runs SGLang's own single-batch benchmark (``sglang.benchmark.one_batch``: a real
``ModelRunner``, CUDA graphs as configured, synthetic prompts) in a fresh process with the
FreeKV plugin installed, on the same GPU, one after the other. Printed last: a table of
median decode step time, throughput and prefill time per (mode, context, batch), and the
ratios FreeKV/dense, FreeKV/synchronous, FreeKV/ArkVale-style, FreeKV/transfers-skipped.

Modes:
  dense      stock SGLang, FlashInfer attention, page size 1, CUDA graphs
  freekv     --kv-retrieval freekv (defaults: speculative recall + correction at 0.9)
  sync       FreeKV with speculation off: select + recall with the current query before
             every layer's attention (same recall kernel)
  arkvale    speculation off and one synchronous host-to-device copy per (page, head), as
             the offloading systems the paper compares with (eager: host-side lists)
  staged     FreeKV with the paper's recall: cudaMemcpyAsync per (head, page) into two
             staging buffers + scatter kernel (eager: host-side lists)
  skip       FreeKV with transfers skipped (upper bound; outputs are wrong)
  freekv-fp8 FreeKV with FP8 tiers; freekv-keepM: with --freekv-keep-margin M (residency hysteresis);
             freekv-overN: with --freekv-overfetch-tokens N (speculative over-fetch; freekv-keepM-overN both);
             freekv-grid2: with --freekv-page-scoring grid2 (calibrated: grid2's own locality measurement)

Variants of a FreeKV mode (``launch/bench_variants.py``): ``MODE@N`` runs the selected-page recall on a
persistent grid of ``N`` programs (``FREEKV_RECALL_PROGRAMS``), ``MODE+W`` gives each recall program ``W``
warps (``FREEKV_RECALL_WARPS``), ``MODE^1`` offloads prefill layers on a side stream
(``FREEKV_ASYNC_PREFILL``), ``MODE:A`` picks the working-set attention kernel (``auto``, the default,
``triton``, ``flashinfer``; ``FREEKV_DECODE_ATTENTION``), e.g. ``freekv@32``, ``freekv@16+2`` or
``freekv@16:flashinfer``.

Cells that do not fit are skipped by SGLang's benchmark (its token pool bounds batch x context):
dense's token pool is sized for the largest cell (``--max-total-tokens``; SGLang's memory fraction
still bounds it), leaving the rest of the GPU to the benchmark's whole-batch prefill; FreeKV's host
tier is sized for the largest cell (``--host-gb auto``) up to 80% of the machine's available memory.
Each cell's result is kept as soon as it is measured. A cell that crashes the benchmark process (an
out-of-memory prefill, a device-side assert) is reported as failed and the cells after it run in new
processes (``--relaunches``); contexts whose prompt and output exceed the model's positions are refused.

Prefill: SGLang's benchmark prefills a whole batch in one forward, whose activations (16 x 32K tokens of
the 8B shape: a 13.7 GiB MLP buffer among others) no longer fit beside dense's KV pool. A batch longer
than ``--prefill-tokens-per-forward`` is prefilled in groups of whole requests, one forward per group,
merged into one decode batch as SGLang's scheduler merges prefilled requests into its running batch
(every mode alike; decode steps are unchanged; the prefill column is the time of all groups).

Rounds: ``--rounds N`` runs the whole list of modes N times, one mode after the other within a round,
so that drift of the machine (other work on the host, clocks) spreads over every mode alike; each cell's
row is the round with the median decode step time, and a second table gives every round's time and the
spread (slowest / fastest) per cell. Separate runs of one mode differ by several percent at batch 1.

Query locality: with random weights consecutive decode queries are unrelated (FreeKV's worst
case). ``--locality calibrated`` makes FreeKV modes replace each decode query by a synthetic one at a
real model's measured locality (``docs/data/locality-smollm2-135m.json``; ``-grid2.json`` for grid2 modes, which
measures grid2's own selection; or ``calibrated:PATH``): per
(layer, KV head) the correction check's similarity is drawn from the measurement and the share of
selected pages that change per step matches it (freekv_sglang/runtime/synthetic.py). ``--query-cosine C``
instead gives consecutive queries a fixed cosine of about C (``0.95``: almost no check fails after the
first step, an optimistic setting). Benchmark only, outputs meaningless; dense attention does not depend on
the query values. A mode's ``%L`` suffix overrides the locality for that mode (``freekv%0.95``,
``freekv%cal``, ``freekv%none``; ``launch/bench_variants.py``), so the calibrated and the optimistic rows can
run side by side.

Usage (GPU machine, repo root):
  python launch/bench_decode.py --model .gpu-bundle/models/llama-8b-shape --contexts 32000 \
      --batch-sizes 1 4 8 --modes dense freekv sync skip --out bench-out
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_capacity  # noqa: E402  (its server runs for --capacity)
from freekv_sglang.provenance import record  # noqa: E402
import capacity_plan  # noqa: E402

MODES = {
    "dense": ["--attention-backend", "flashinfer"],
    "freekv": ["--kv-retrieval", "freekv"],
    "sync": ["--kv-retrieval", "freekv", "--freekv-no-speculative"],
    "arkvale": ["--kv-retrieval", "freekv", "--freekv-no-speculative", "--freekv-recall", "per-page",
                "--disable-cuda-graph"],
    "staged": ["--kv-retrieval", "freekv", "--freekv-recall", "staged", "--disable-cuda-graph"],
    "skip": ["--kv-retrieval", "freekv", "--freekv-recall", "skip"],
    "freekv-fp8": ["--kv-retrieval", "freekv", "--freekv-kv-storage", "fp8_e4m3"],  # FP8 tiers
}


def mode_args(base: str) -> list[str]:
    """SGLang arguments of a base mode; ``freekv-keepM`` is ``freekv`` with ``--freekv-keep-margin M``,
    ``freekv-overN`` with ``--freekv-overfetch-tokens N`` (``bench_variants.base_options``)."""
    from bench_variants import base_flags, base_options

    plain, opts = base_options(base)
    return MODES[plain] + base_flags(opts)


def parse_mode(name: str) -> tuple[str, dict]:
    """``"freekv@32+2"`` -> ``("freekv", {"FREEKV_RECALL_PROGRAMS": "32", "FREEKV_RECALL_WARPS": "2"})``."""
    from bench_variants import base_options, parse_variant

    try:
        base, env = parse_variant(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if base_options(base)[0] not in MODES:
        raise argparse.ArgumentTypeError(f"unknown mode {base!r} in {name!r}; choose from {sorted(MODES)}")
    if env and base == "dense":
        raise argparse.ArgumentTypeError(f"{name!r}: variants apply to FreeKV modes only")
    return base, env


def locality_spec(spec: str) -> str:
    """``--locality``: ``calibrated`` (kept as it is: each mode takes the measurement of its own page scoring at
    launch) or ``calibrated:PATH`` -> ``calibrated:ABSOLUTE_PATH`` (bench_variants)."""
    from bench_variants import locality_spec as resolve

    try:
        resolved = resolve(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec if spec == "calibrated" else resolved


def mode_name(name: str) -> str:
    parse_mode(name)
    return name


def kv_bytes_per_token(model: str) -> int:
    """Bytes of K and V per token over all layers, from the model folder's ``config.json`` (bf16/fp16)."""
    from freekv_sglang.runtime.sizing import kv_bytes_per_token as per_token

    return per_token(capacity_plan.model_shape(model)[0])


def context_limit(model: str, extra) -> int:
    """Positions a request may use: ``--context-length`` among the SGLang arguments, else the model's
    ``max_position_embeddings``."""
    for i, x in enumerate(extra):
        if x == "--context-length" and i + 1 < len(extra):
            return int(extra[i + 1])
        if x.startswith("--context-length="):
            return int(x.split("=", 1)[1])
    return capacity_plan.model_shape(model)[1]


def check_contexts(model: str, contexts, output_len: int, extra) -> str | None:
    """Why a context cannot run (None if all can): a prompt plus its output beyond the model's positions
    makes SGLang's benchmark index past its rotary table, a device-side assert that ends the mode's
    remaining cells too."""
    limit = context_limit(model, extra)
    bad = [c for c in contexts if c + output_len > limit]
    if bad:
        return (f"contexts {bad} + {output_len} output tokens exceed the model's {limit} positions; the longest "
                f"context that fits is {limit - output_len} (e.g. --contexts {limit - output_len - 1024} for "
                f"'128K' at this limit)")
    return None


def available_gib() -> float | None:
    """The machine's available memory (``MemAvailable``) in GiB, None where unknown."""
    from freekv_sglang.config import read_meminfo

    avail = read_meminfo().get("MemAvailable")
    return None if avail is None else avail / 2**30


def auto_host_gb(model: str, batch_sizes, contexts, output_len: int) -> float:
    """Host tier for the largest cell (plus 5%), at most 80% of the available memory."""
    need = max(batch_sizes) * (max(contexts) + output_len + 64) * kv_bytes_per_token(model) * 1.05 / 2**30
    avail = available_gib()
    gb = need if avail is None else min(need, 0.8 * avail)
    return round(max(gb, 1.0), 1)


def cells_beyond_host_tier(model: str, host_gb: float, batch_sizes, contexts, output_len: int) -> list[tuple[int, int]]:
    """(batch, context) cells whose prompts and outputs need more tokens than a ``host_gb`` host tier holds:
    SGLang's benchmark skips them in the FreeKV modes (the tier is FreeKV's token pool)."""
    tokens = int(host_gb * 2**30 // kv_bytes_per_token(model))
    return [(b, c) for c in contexts for b in batch_sizes if b * (c + output_len) > tokens]


def dense_pool_tokens(a) -> int:
    """Token-pool size for dense: the largest cell plus one page of slack per request."""
    return max(a.batch_sizes) * (max(a.contexts) + a.output_len + 64)


def memory_fields(model_runner, rt, batch: int, tokens: int, model: str) -> dict:
    """KV memory of one cell in GiB: what the batch occupies on the GPU and in the host tier, and the
    GPU pool reserved for KV (dense: SGLang's token pool; FreeKV: working sets + digests + scratch)."""
    g = 2**30
    if rt is None:  # dense: the whole KV on the GPU
        try:
            k, v = model_runner.token_to_kv_pool.get_kv_size_bytes()
            pool = (k + v) / g
        except Exception:  # noqa: BLE001 - a pool without the accessor: leave it out
            pool = None
        return {"kv_gpu_gib": batch * tokens * kv_bytes_per_token(model) / g, "kv_gpu_pool_gib": pool,
                "kv_host_gib": 0.0}
    gpu, host = rt.used_bytes(batch, tokens)
    return {"kv_gpu_gib": gpu / g, "kv_gpu_pool_gib": rt.gpu_bytes / g, "kv_host_gib": host / g}


def recording(run_once, result_file: str, model: str, current_runtime):
    """Wrap the benchmark's ``latency_test_run_once``: each measured cell gets FreeKV's decode statistics and
    its KV memory, and is appended to ``result_file`` (JSON lines) right away."""

    def run_once_with_stats(*args, **kwargs):
        rt = current_runtime()
        if rt is not None:
            rt.reset_stats()
        ret = run_once(*args, **kwargs)
        if ret is None:  # a cell the benchmark skipped
            return ret
        ret.update(memory_fields(args[1], rt, ret["batch_size"], ret["input_len"] + ret["output_len"], model))
        if rt is not None:
            ret.update({f"freekv_{k}": v for k, v in rt.stats().items()})
        with open(result_file, "a") as f:
            f.write(json.dumps(ret) + "\n")
        return ret

    return run_once_with_stats


PREFILL_TOKENS_ENV = "FREEKV_BENCH_PREFILL_TOKENS_PER_FORWARD"  # set by run_mode for its worker


def prefill_groups(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive groups of request indices whose prompt lengths sum to at most ``max_tokens`` (a
    longer request forms its own group); ``max_tokens <= 0``: one group."""
    if max_tokens <= 0 or sum(lengths) <= max_tokens:
        return [list(range(len(lengths)))]
    groups, cur, n = [], [], 0
    for i, length in enumerate(lengths):
        if cur and n + length > max_tokens:
            groups.append(cur)
            cur, n = [], 0
        cur.append(i)
        n += length
    groups.append(cur)
    return groups


def grouped_extend(extend, max_tokens: int):
    """Wrap the benchmark's ``extend(reqs, model_runner) -> (next_token_ids, logits, batch)``: prefill in
    :func:`prefill_groups`, then merge the groups' batches into one (``ScheduleBatch.merge_batch``, as the
    scheduler does with newly prefilled requests) and concatenate their next tokens. The logits of a
    grouped prefill are not kept (``None``; the latency benchmark does not read them)."""

    def run(reqs, model_runner):
        groups = prefill_groups([len(r.origin_input_ids) for r in reqs], max_tokens)
        if len(groups) == 1:
            return extend(reqs, model_runner)
        import torch

        ids, batch = [], None
        for g in groups:
            nxt, _, b = extend([reqs[i] for i in g], model_runner)
            ids.append(nxt)
            if batch is None:
                batch = b
            else:
                batch.merge_batch(b)
        return torch.cat(ids), None, batch

    return run


def worker(argv: list[str]) -> None:
    """Run SGLang's one-batch benchmark in this process with FreeKV's hooks installed."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry

    load_plugins()  # FreeKV's CLI flags
    # the benchmark runs the model in this (main) process: install the runtime hooks here too;
    # they stay inert unless the parsed arguments enable FreeKV
    from freekv_sglang.runtime.integration import install_runtime_hooks

    install_runtime_hooks(None)
    HookRegistry.apply_hooks()
    import sglang.benchmark.one_batch as one_batch

    from freekv_sglang.runtime.integration import current_runtime

    model = argv[argv.index("--model-path") + 1]
    # each cell's result is appended as soon as it is measured (the benchmark itself writes all of them
    # at the end, so a later cell running out of memory would lose the earlier ones)
    i = argv.index("--result-filename")
    result_file, argv = argv[i + 1], [*argv[: i + 1], "", *argv[i + 2:]]
    run_once_with_stats = recording(one_batch.latency_test_run_once, result_file, model, current_runtime)
    one_batch.latency_test_run_once = run_once_with_stats
    one_batch.extend = grouped_extend(one_batch.extend, int(os.environ.get(PREFILL_TOKENS_ENV, "0")))
    sys.argv = ["one_batch", *argv]
    one_batch.cli_main()


def cell_order(batch_sizes, contexts) -> list[tuple[int, int]]:
    """(batch, context) cells in the order SGLang's one-batch benchmark runs them (batch outermost)."""
    return [(b, c) for b in batch_sizes for c in contexts]


_SKIP_RE = re.compile(r"skipping \((\d+), (\d+), (\d+)\) due to max batch size limit")


def skipped_cells(log_text: str) -> set[tuple[int, int]]:
    """(batch, context) cells the benchmark skipped because they do not fit its token pool."""
    return {(int(b), int(c)) for b, c, _ in _SKIP_RE.findall(log_text)}


def relaunch_plan(batch_sizes, contexts, done, skipped):
    """After a launch over ``batch_sizes x contexts`` ended with an error: the cell it died in (the
    first in run order neither measured nor skipped; None if there is none) and the launches
    ``(batch_sizes, contexts)`` that cover every cell after it, so that one failing cell (an
    out-of-memory prefill, a device-side assert) does not take the rest of the mode with it."""
    failed = next((cell for cell in cell_order(batch_sizes, contexts) if cell not in done and cell not in skipped),
                  None)
    if failed is None:
        return None, []
    b, c = failed
    launches = []
    rest_c = list(contexts)[list(contexts).index(c) + 1:]
    if rest_c:
        launches.append(([b], rest_c))
    rest_b = list(batch_sizes)[list(batch_sizes).index(b) + 1:]
    if rest_b:
        launches.append((rest_b, list(contexts)))
    return failed, launches


def run_mode(mode: str, a, out_dir: str) -> list[dict]:
    """All cells of one mode: SGLang's one-batch benchmark in a fresh process (``--worker``), relaunched
    (at most ``a.relaunches`` times) for the cells after one that crashed it."""
    from bench_variants import apply_variant_env

    base, mode_env = parse_mode(mode)
    safe = mode
    for sep, tag in (("@", "-g"), ("+", "-w"), ("^", "-a"), (":", "-"), ("%", "-loc")):
        safe = safe.replace(sep, tag)
    res = os.path.join(out_dir, f"one_batch-{safe}.jsonl")
    if os.path.exists(res):
        os.remove(res)
    common = ["--model-path", a.model, "--load-format", "dummy", "--run-name", mode,
              "--output-len", str(a.output_len), "--result-filename", res,
              "--cuda-graph-max-bs", str(max(a.batch_sizes)), *mode_args(base)]
    if base == "dense":
        # the token pool sized for the largest cell (as one would set it for this workload): the rest of
        # the GPU stays free for the benchmark's prefill, which runs a whole batch x context in one forward
        # (SGLang's default pool leaves too little for that at 4 x 32K on a 141 GB card). Cells beyond
        # what the GPU holds are skipped by the benchmark.
        common += ["--max-total-tokens", str(dense_pool_tokens(a))]
    else:
        common += ["--freekv-host-memory-gb", str(a.host_gb), "--max-running-requests", str(max(a.batch_sizes))]
    common += a.extra
    env = dict(os.environ, FREEKV_LOG_STATS_EVERY="0")  # statistics are collected per measurement
    env.pop("FREEKV_BENCH_QUERY_COSINE", None)
    env.pop("FREEKV_BENCH_LOCALITY", None)
    env[PREFILL_TOKENS_ENV] = str(a.prefill_tokens_per_forward)
    if a.query_cosine is not None and base != "dense":
        env["FREEKV_BENCH_QUERY_COSINE"] = str(a.query_cosine)
    if getattr(a, "locality", None) is not None and base != "dense":
        env["FREEKV_BENCH_LOCALITY"] = a.locality
    apply_variant_env(mode_env, env)  # after: a mode's own locality (%L) wins
    if env.get("FREEKV_BENCH_LOCALITY") == "calibrated":
        from bench_variants import locality_spec as resolve, page_scoring_of

        env["FREEKV_BENCH_LOCALITY"] = resolve("calibrated", page_scoring_of(base))
    log = os.path.join(out_dir, f"one_batch-{safe}.log")
    open(log, "w").close()
    t0 = time.time()
    queue, relaunches, failed = [(list(a.batch_sizes), list(a.contexts))], 0, []
    while queue:
        batch_sizes, contexts = queue.pop(0)
        args = ["--batch-size", *map(str, batch_sizes), "--input-len", *map(str, contexts), *common]
        start = os.path.getsize(log)
        with open(log, "a") as f:
            f.write("args: " + " ".join(args) + "\n")
            f.flush()
            try:
                rc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", *args], stdout=f,
                                    stderr=subprocess.STDOUT, timeout=a.timeout, env=env).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"  # keep what the finished cells wrote
        if rc == 0:
            continue
        if rc == "timeout":  # the mode's time is up: no relaunches
            break
        with open(log, errors="replace") as f:
            f.seek(start)
            skipped = skipped_cells(f.read())
        cell, more = relaunch_plan(batch_sizes, contexts, {(r["batch_size"], r["input_len"]) for r in
                                                           read_rows(res, a.output_len)}, skipped)
        if cell is not None:
            failed.append(cell)
        if more and relaunches < a.relaunches:
            relaunches += len(more)
            print(f"[bench] {mode}: the run died in cell batch {cell[0]} x context {cell[1]} (rc={rc}); "
                  f"relaunching for the cells after it: {more}", flush=True)
            queue = more + queue
    rows = read_rows(res, a.output_len)
    note = f"; failed cells (batch, context): {failed}" if failed else ""
    print(f"[bench] {mode}: rc={rc}, {len(rows)} results in {time.time() - t0:.0f}s (log {log}){note}", flush=True)
    if rc != 0 or not rows:
        with open(log, errors="replace") as f:
            print("".join(f.readlines()[-15:]), flush=True)
    return rows


def read_rows(path: str, output_len: int) -> list[dict]:
    """The measured cells in a results file (none if it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return measured_rows([json.loads(line) for line in f if line.strip()], output_len)


def measured_rows(rows: list[dict], output_len: int) -> list[dict]:
    """The cells ``one_batch`` measured, without its warm-up pass: the warm-up runs the first cell with a
    shorter output and is written to the same file. Rows of another output length are dropped, and of
    two rows for one (context, batch) cell the later one is kept."""
    cells: dict[tuple[int, int], dict] = {}
    for r in rows:
        if r.get("output_len", output_len) == output_len:
            cells[(r["input_len"], r["batch_size"])] = r
    return list(cells.values())


def _decode_ms(r: dict) -> float | None:
    v = r.get("median_decode_latency")
    return None if v is None else 1000 * v


def _gib(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def h2d_ceiling_gbps() -> float | None:
    """Pinned host-to-device copy rate in GB/s (the PCIe ceiling, ``bench_kernels.py``'s measurement);
    None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    import bench_kernels

    return bench_kernels.pinned_copy_gbps()[0]


def table(results: dict[str, list[dict]], contexts=(), batch_sizes=(), h2d_gbps: float | None = None) -> str:
    """Markdown table, one line per measured cell; requested cells without a result are listed as skipped.
    With ``h2d_gbps`` (the PCIe ceiling), a column gives the time one step's recall takes at that rate."""
    lines = ["| mode | context | batch | decode ms/step (median) | tokens/s | prefill s | correction rate "
             "| recall MiB/request/step | recall at PCIe ceiling ms/step | KV on GPU GiB (pool) | KV in host GiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, rows in results.items():
        for r in rows:
            d = _decode_ms(r)
            corr = r.get("freekv_correction_rate")
            mib = r.get("freekv_recall_bytes_per_request_step")
            extra = (f"{corr:.3f} | {mib / 2**20:.2f} |" if corr is not None and mib is not None else "- | - |")
            pcie = (f" {r['batch_size'] * mib / (h2d_gbps * 1e9) * 1e3:.2f} |"
                    if mib is not None and h2d_gbps and not mode.startswith("skip") else " - |")
            mem = f" {_gib(r.get('kv_gpu_gib'))} ({_gib(r.get('kv_gpu_pool_gib'))}) | {_gib(r.get('kv_host_gib'))} |"
            lines.append(f"| {mode} | {r['input_len']} | {r['batch_size']} | {d:.2f} | {r['batch_size'] * 1000 / d:.0f} "
                         f"| {r.get('prefill_latency', float('nan')):.2f} | {extra}{pcie}{mem}" if d else
                         f"| {mode} | {r['input_len']} | {r['batch_size']} | - | - | - | {extra}{pcie}{mem}")
        done = {(r["input_len"], r["batch_size"]) for r in rows}
        for c in contexts:
            for b in batch_sizes:
                if (c, b) not in done:
                    lines.append(f"| {mode} | {c} | {b} | skipped (does not fit, or the mode failed / timed out: "
                                 f"see its log) | | | | | | | |")
    return "\n".join(lines)


def ratios(results: dict[str, list[dict]]) -> str:
    key = {m: {(r["input_len"], r["batch_size"]): _decode_ms(r) for r in rows} for m, rows in results.items()}
    if "freekv" not in key:
        return ""
    others = [m for m in key if m != "freekv"]
    lines = ["| context | batch | " + " | ".join(f"speed-up vs {m}" for m in others) + " |",
             "|---:|---:|" + "---:|" * len(others)]
    for (c, b), ours in sorted(key["freekv"].items()):
        cells = []
        for m in others:
            theirs = key[m].get((c, b))
            cells.append(f"{theirs / ours:.2f}x" if theirs and ours else "-")
        lines.append(f"| {c} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge_rounds(rounds: list[dict[str, list[dict]]]) -> dict[str, list[dict]]:
    """Per mode and cell, the row of the round with the median decode step time (of an even count, the
    lower middle one), with every round's time in ``decode_ms_rounds`` (round order; ``None`` where a round
    has no time for the cell). ``rounds``: one ``{mode: rows}`` per round."""
    merged: dict[str, list[dict]] = {}
    for mode in dict.fromkeys(m for rnd in rounds for m in rnd):
        cells: dict[tuple[int, int], list] = {}
        for i, rnd in enumerate(rounds):
            for r in rnd.get(mode, []):
                cells.setdefault((r["input_len"], r["batch_size"]), [None] * len(rounds))[i] = r
        rows = []
        for _, per_round in sorted(cells.items()):
            timed = sorted((r for r in per_round if r is not None and _decode_ms(r) is not None), key=_decode_ms)
            pick = timed[(len(timed) - 1) // 2] if timed else next(r for r in per_round if r is not None)
            rows.append(dict(pick, decode_ms_rounds=[None if r is None else _decode_ms(r) for r in per_round]))
        merged[mode] = rows
    return merged


def spread_table(results: dict[str, list[dict]]) -> str:
    """Markdown: every round's decode step time per (mode, cell) and the spread (slowest / fastest)."""
    lines = ["| mode | context | batch | decode ms/step per round | spread |", "|---|---:|---:|---|---:|"]
    for mode, rows in results.items():
        for r in rows:
            ts = r.get("decode_ms_rounds") or []
            got = [t for t in ts if t is not None]
            spread = f"{max(got) / min(got):.3f}x" if len(got) > 1 else "-"
            lines.append(f"| {mode} | {r['input_len']} | {r['batch_size']} | "
                         + ", ".join("-" if t is None else f"{t:.2f}" for t in ts) + f" | {spread} |")
    return "\n".join(lines)


def run_capacity(a) -> list[dict]:
    """Concurrent ``a.capacity``-token requests served by dense and FreeKV (bench_capacity.py's servers)."""
    host_gb = a.capacity_host_gb or round(0.8 * (available_gib() or 16.0), 1)
    ns = argparse.Namespace(model=a.model, context=a.capacity, new_tokens=a.output_len, host_gb=host_gb,
                            max_requests=a.capacity_max_requests, timeout=max(a.timeout, 1200.0), port=30031,
                            out=a.out, gpu_tier_gb=a.capacity_gpu_tier_gb)
    rows = []
    for mode in ("dense", "freekv") + (("freekv-tier",) if a.capacity_gpu_tier_gb else ()):
        try:
            rows.append(bench_capacity.run(mode, ns))
        except Exception as e:  # noqa: BLE001 - report it, keep the decode results
            rows.append({"mode": mode, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(f"[bench] capacity {mode}: {rows[-1]}", flush=True)
    return rows


def versions() -> str:
    """Versions of the stack the benchmark runs on (missing packages are named as such)."""
    from importlib import metadata

    out = []
    for pkg in ("torch", "triton", "flashinfer-python", "sglang", "freekv-sglang"):
        try:
            out.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            out.append(f"{pkg} (not installed)")
    return ", ".join(out)


def header(card: str, a, h2d: float | None, argv: list[str]) -> str:
    """First lines of the Markdown report: card, versions, model shape, locality, PCIe ceiling, command."""
    import shlex

    loc = ("random-weight queries" if a.query_cosine is None else
           f"FreeKV modes with synthetic consecutive-query cosine {a.query_cosine}")
    if getattr(a, "locality", None) is not None:
        loc = (f"FreeKV modes at the calibrated query locality ({a.locality}: per layer and KV head the correction "
               f"check's similarity drawn from the measurement, page change matched)")
    overrides = [m for m in getattr(a, "modes", []) if "%" in m]
    if overrides:
        loc += "; modes named %L use their own locality: " + ", ".join(overrides)
    ceiling = f"pinned H2D ceiling {h2d:.1f} GB/s" if h2d else "no H2D ceiling measured"
    try:
        sh = capacity_plan.model_shape(a.model)[0]
        shape = f"{sh.n_layers} layers, {sh.n_q_heads} query / {sh.n_kv_heads} KV heads, head dim {sh.head_dim}"
    except (ValueError, KeyError):  # the report still names the folder
        shape = "shape unknown"
    return (f"card: {card}; {versions()}\n\nmodel: {a.model} ({shape}, dummy weights); output_len {a.output_len}; "
            f"{loc}; {ceiling}\n\ncommand: `python launch/bench_decode.py {shlex.join(argv)}`")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=".gpu-bundle/models/llama-8b-shape")
    p.add_argument("--contexts", type=int, nargs="+", default=[32000])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--modes", nargs="+", default=["dense", "freekv", "sync", "arkvale", "staged", "skip"],
                   type=mode_name, help=f"modes {sorted(MODES)}, FreeKV ones optionally with %%L (locality: cal, none or a "
                                        f"cosine), @N (recall grid), "
                                        f"/S (side streams), :A (attention kernel) and :flashinfer~K (its split pages)")
    p.add_argument("--host-gb", default="auto", help="FreeKV host tier per run (GiB, or auto: the largest cell)")
    p.add_argument("--timeout", type=float, default=900.0, help="per launch of a mode, seconds")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the list of modes this many times, interleaved; each cell reports its median round")
    p.add_argument("--relaunches", type=int, default=3,
                   help="per mode: extra launches for the cells after one that crashed the benchmark")
    loc = p.add_mutually_exclusive_group()
    loc.add_argument("--locality", default=None, metavar="calibrated[:PATH]", type=locality_spec,
                     help="FreeKV modes only: replace decode queries by synthetic ones at a measured real locality "
                          "(calibrated: docs/data/locality-smollm2-135m.json, -grid2.json for grid2 modes; or the JSON of python -m "
                          "freekv_sglang.fidelity.locality); outputs become meaningless")
    loc.add_argument("--query-cosine", type=float, default=None,
                     help="FreeKV modes only: replace decode queries so that consecutive ones have this cosine "
                          "(random weights give ~0, FreeKV's worst case; 0.95 is optimistic: almost no check fails; "
                          "outputs become meaningless; see freekv_sglang/runtime/synthetic.py)")
    p.add_argument("--capacity", type=int, default=None, metavar="CONTEXT",
                   help="also measure how many CONTEXT-token requests dense and FreeKV serve at once "
                        "(launch/bench_capacity.py: a server per mode)")
    p.add_argument("--capacity-max-requests", type=int, default=64)
    p.add_argument("--capacity-host-gb", type=float, default=None,
                   help="FreeKV host tier for the capacity run (default: 80%% of the available memory)")
    p.add_argument("--capacity-gpu-tier-gb", type=float, default=0.0,
                   help="also run FreeKV with this --freekv-gpu-tier-gb in the capacity run (0: not)")
    p.add_argument("--prefill-tokens-per-forward", type=int, default=131072,
                   help="prefill a batch longer than this in groups of whole requests, one forward each "
                        "(every mode; 0: the whole batch in one forward, as SGLang's benchmark does; dense's "
                        "8 x 32K forward ran out of memory on an 80 GB H100)")
    p.add_argument("--out", default="bench-out", help="folder for logs and results")
    p.add_argument("--commit", help="commit to record (default: the checkout's HEAD)")
    p.add_argument("--docs", default=None, metavar="DIR",
                   help="also copy the Markdown table, the plot and the JSON into DIR (e.g. docs/results), named "
                        "by card and date")
    p.add_argument("extra", nargs="*", help="extra SGLang arguments after --")
    a = p.parse_args()
    if a.rounds < 1:
        p.error(f"--rounds must be at least 1, got {a.rounds}")
    has_config = os.path.exists(os.path.join(a.model, "config.json"))
    if has_config:
        why = check_contexts(a.model, a.contexts, a.output_len, a.extra)
        if why:
            p.error(why)
    a.host_gb = (auto_host_gb(a.model, a.batch_sizes, a.contexts, a.output_len) if a.host_gb == "auto"
                 else float(a.host_gb))
    if has_config and any(parse_mode(m)[0] != "dense" for m in a.modes):
        beyond = cells_beyond_host_tier(a.model, a.host_gb, a.batch_sizes, a.contexts, a.output_len)
        if beyond:
            print(f"[bench] warning: a {a.host_gb:g} GiB host tier does not hold the cells (batch, context) {beyond}: "
                  f"the FreeKV modes will skip them (--host-gb auto sizes the tier for the largest cell, up to 80% "
                  f"of the available memory)", flush=True)
    os.makedirs(a.out, exist_ok=True)
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    h2d = h2d_ceiling_gbps()  # measured in this process before the modes run (no SGLang process alive)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    head = {"provenance": record("launch/bench_decode.py", sys.argv[1:], a.commit), "card": card, "h2d_gbps": h2d,
            "args": vars(a)}
    rounds: list[dict[str, list[dict]]] = []

    def save_json(**extra):  # rewritten as each cell lands, so a crash keeps what was measured
        with open(os.path.join(a.out, "bench_decode.json"), "w") as f:
            json.dump({**head, "results": results, **({"rounds": rounds} if a.rounds > 1 else {}), **extra}, f,
                      indent=1)

    for i in range(a.rounds):
        out_dir = a.out if a.rounds == 1 else os.path.join(a.out, f"round{i + 1}")
        os.makedirs(out_dir, exist_ok=True)
        rounds.append({})
        for mode in a.modes:
            rounds[-1][mode] = run_mode(mode, a, out_dir)
            results = rounds[0] if a.rounds == 1 else merge_rounds(rounds)
            save_json()
    capacity = run_capacity(a) if a.capacity else None
    if capacity is not None:
        save_json(capacity=capacity)
    out = (f"{header(card, a, h2d, sys.argv[1:])}\n\n"
           f"{table(results, a.contexts, a.batch_sizes, h2d)}\n\n"
           f"{ratios(results)}\n" + (f"\n{spread_table(results)}\n" if a.rounds > 1 else "")
           + (f"\n{bench_capacity.table(capacity, a.capacity)}\n" if capacity else ""))
    with open(os.path.join(a.out, "bench_decode.md"), "w") as f:
        f.write(out)
    print(out)
    png = os.path.join(a.out, "bench_decode.png")
    try:  # tokens/s vs batch, one panel per context (matplotlib may be missing on a GPU machine)
        import plot_bench

        plot_bench.plot_decode({**head, "results": results}, png)
        print(f"plot: {png}")
    except (ImportError, ValueError):  # no matplotlib, or no decode result to draw
        print(f"plot: python launch/plot_bench.py --decode {os.path.join(a.out, 'bench_decode.json')} --out {png}")
    if a.docs:
        for path in publish(a.out, a.docs, card):
            print(f"docs: {path}")


def docs_stem(card: str, day: str | None = None) -> str:
    """``bench_decode-<card>-<date>``: e.g. ``bench_decode-nvidia-h200-2026-11-28``."""
    import datetime
    import re

    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") or "card"
    return f"bench_decode-{slug}-{day or datetime.date.today().isoformat()}"


def publish(out_dir: str, docs_dir: str, card: str) -> list[str]:
    """Copy ``bench_decode.{md,png,json}`` of ``out_dir`` into ``docs_dir`` under :func:`docs_stem`'s name
    (a second run of the day gets ``-2``, ``-3``, ...). Returns the written paths."""
    import shutil

    os.makedirs(docs_dir, exist_ok=True)
    stem, n = docs_stem(card), 1
    while any(os.path.exists(os.path.join(docs_dir, f"{stem}{'' if n == 1 else f'-{n}'}.{e}")) for e in ("md", "json")):
        n += 1
    name = stem if n == 1 else f"{stem}-{n}"
    written = []
    for ext in ("md", "png", "json"):
        src = os.path.join(out_dir, f"bench_decode.{ext}")
        if os.path.exists(src):
            dst = os.path.join(docs_dir, f"{name}.{ext}")
            shutil.copyfile(src, dst)
            written.append(dst)
    return written


if __name__ == "__main__":
    main()
