"""Served throughput under SGLang's own load generator: dense SGLang against FreeKV, one GPU, one invocation.

Each mode is a stock ``python -m sglang.launch_server`` started in turn on the same GPU (Llama-3.1-8B shape,
``--load-format dummy``, ``--enable-metrics``). Against each, SGLang's ``bench_serving``
(``sglang.benchmark.serving``, run as a subprocess through this script's ``--client`` entry) sends the
workloads at each concurrency (``--max-concurrency``, requests sent as fast as slots free up):

* ``32k``: ``--input-len`` (32000) tokens of random ids per prompt, ``--output-len`` (512) new tokens, every
  prompt the same length (``--dataset-name random-ids --random-range-ratio 1 --tokenize-prompt``: the ids go to
  ``/generate`` as ids, so the lengths are exact; ``--dataset-name random`` would download ShareGPT, which a
  machine without network access cannot);
* ``mixed``: prompt lengths drawn log-uniformly from ``--mixed-min``..``--mixed-max`` (4096..130048 tokens: as
  many prompts of 4-8K as of 64-128K), the same ``--output-len``; the lengths are drawn here (seeded, the same for
  every mode) and the client replaces bench_serving's dataset with prompts of random ids of those lengths.

Modes (``--modes``; :data:`MODES` holds the flags of each):

* ``dense``: dense SGLang with its defaults (FlashInfer, bf16 KV, overlap scheduler on);
* ``dense-fp8``: the same with SGLang's FP8 KV cache (``--kv-cache-dtype fp8_e4m3``);
* ``freekv``: ``--kv-retrieval freekv`` with its defaults (the plugin turns the overlap scheduler off);
* ``freekv-skip``: FreeKV with host-to-GPU transfers skipped (``--freekv-recall skip``): the bound, outputs wrong;
* ``freekv-overlap``: FreeKV with SGLang's overlap scheduler left on (``FREEKV_EXPERIMENTAL_OVERLAP_SCHEDULE=1``).

Query locality of the FreeKV modes: dummy weights make every decode query unrelated to the previous one, so by
default each FreeKV server replaces its decode queries by synthetic ones at the calibrated locality
(``FREEKV_BENCH_LOCALITY=calibrated:docs/data/locality-smollm2-135m.json``, SmolLM2-135M's measured
correction rate and page change, ``freekv_sglang/runtime/synthetic.py``); ``--query-cosine C`` gives the fixed
cosine instead (0.95: the optimistic setting of the decode tables), ``--locality none`` the model's own queries.
Generated tokens are meaningless either way; dense attention does not depend on query values.

Reported per (mode, workload, concurrency): output tokens/s, TTFT and inter-token latency p50 / p99 (from
bench_serving), requests decoding at once (max and median of SGLang's ``Decode batch`` log lines during the
cell; the peak of ``sglang:num_running_reqs`` polled from ``/metrics`` beside it), requests queued at most,
failed requests, FreeKV's corrected share of (layer, KV head) checks and recall MiB per request-step during the
cell (its ``sglang:freekv_*`` counters), and each mode's output tokens/s over dense's and over dense-fp8's.
Writes ``bench_serve.json`` (every cell, with commit, versions, card, host and command), ``bench_serve.md``
(the tables) and ``bench_serve.png`` (output tokens/s vs concurrency, where matplotlib is installed) under
``--out``; each cell is also kept under ``--out/cells/``, and a later invocation with the same ``--out`` skips
the cells already measured (so a run cut short, or one split over several calls to a warm machine, continues).

``--quick``: the ``32k`` workload at concurrency 4 and 16, one prompt per slot (4 and 16 prompts), and a time
budget of 540 s (``--budget-s``): no server is started with less than 180 s left and each bench_serving run
stops at the budget, so the invocation ends within 9 minutes; a mode's server takes about 2 minutes to start and
its two cells about 1.5, so one quick invocation measures about two modes, and repeating it with the same
``--out`` measures the next ones. The full run (both workloads, concurrency 4 / 16 / 64, two prompts per slot,
five modes) takes about 1.5-2 hours on one H100 (``--dry-run`` prints the plan and this script's estimate).

Usage (GPU machine, repo root):
  python launch/bench_serve.py --model .gpu-bundle/models/llama-8b-shape --out serve-out            # full
  python launch/bench_serve.py --quick --modes dense freekv --out serve-out                          # 9 minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from freekv_sglang.serving import Server  # noqa: E402
from freekv_sglang.provenance import host, record  # noqa: E402


@dataclass(frozen=True)
class Mode:
    """A server configuration: SGLang flags, environment, whether FreeKV serves, what it is."""

    args: tuple[str, ...]
    env: dict = field(default_factory=dict)
    freekv: bool = False
    label: str = ""


DENSE = ("--attention-backend", "flashinfer")
FREEKV = ("--kv-retrieval", "freekv")
MODES: dict[str, Mode] = {
    "dense": Mode(DENSE, {}, False, "dense SGLang, defaults (bf16 KV, overlap scheduler on)"),
    "dense-fp8": Mode(DENSE + ("--kv-cache-dtype", "fp8_e4m3"), {}, False, "dense SGLang, FP8 KV cache"),
    "freekv": Mode(FREEKV, {}, True, "FreeKV, defaults (overlap scheduler off)"),
    "freekv-skip": Mode(FREEKV + ("--freekv-recall", "skip"), {}, True,
                        "FreeKV, transfers skipped (bound; outputs wrong)"),
    "freekv-overlap": Mode(FREEKV, {"FREEKV_EXPERIMENTAL_OVERLAP_SCHEDULE": "1"}, True,
                           "FreeKV, overlap scheduler on (opt-in)"),
}
WORKLOADS = ("32k", "mixed")
QUICK = {"workloads": ["32k"], "concurrency": [4, 16], "prompts_per_slot": 1.0, "budget_s": 540.0}

#: Rough time model of :func:`estimate_seconds` (H100, Llama-3.1-8B shape; not fitted to a run of this script).
START_S = 120.0  # a server's start-up: dummy weights, CUDA graphs, FreeKV's host tier and first Triton compiles
PREFILL_TOKENS_PER_S = 22000.0  # at short contexts; attention makes it slower as the prompt grows (below)
DECODE_STEP_S = 0.025
MIN_START_LEFT_S = 180.0  # no server is started with less of the budget left
MIN_CELL_LEFT_S = 60.0  # no cell is started with less of the budget left


# ------------------------------------------------------------------------------------------------ workloads
def mixed_lengths(n: int, lo: int, hi: int, seed: int) -> list[int]:
    """``n`` prompt lengths drawn log-uniformly from ``lo``..``hi`` (seeded: every mode gets the same ones)."""
    rng = random.Random(seed)
    return [min(hi, max(lo, round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))) for _ in range(n)]


def num_prompts(concurrency: int, per_slot: float, minimum: int) -> int:
    return max(minimum, math.ceil(per_slot * concurrency))


def cell_seed(a, workload: str, concurrency: int) -> int:
    return a.seed + 1000 * WORKLOADS.index(workload) + concurrency


def prompt_lengths(a, workload: str, concurrency: int) -> list[int]:
    n = num_prompts(concurrency, a.prompts_per_slot, a.min_prompts)
    if workload == "32k":
        return [a.input_len] * n
    return mixed_lengths(n, a.mixed_min, a.mixed_max, cell_seed(a, workload, concurrency))


def length_summary(lengths: list[int]) -> dict:
    return {"n": len(lengths), "min": min(lengths), "median": statistics.median(lengths), "max": max(lengths),
            "mean": round(statistics.fmean(lengths), 1)}


# ------------------------------------------------------------------------------------------------ client
def client_command(a, workload: str, concurrency: int, out_file: str, lengths_file: str | None) -> list[str]:
    """The bench_serving run of one cell (through this script's ``--client`` entry, see :func:`client_main`)."""
    lengths = prompt_lengths(a, workload, concurrency)
    cmd = [sys.executable, os.path.abspath(__file__), "--client"]
    if lengths_file:
        cmd += ["--lengths", lengths_file]
    return cmd + ["--", "--backend", "sglang", "--host", "127.0.0.1", "--port", str(a.port),
                  "--model", a.model, "--tokenizer", a.model, "--dataset-name", "random-ids", "--tokenize-prompt",
                  "--random-input-len", str(max(lengths)), "--random-output-len", str(a.output_len),
                  "--random-range-ratio", "1", "--num-prompts", str(len(lengths)),
                  "--max-concurrency", str(concurrency), "--request-rate", "inf",
                  "--seed", str(cell_seed(a, workload, concurrency)), "--warmup-requests", str(a.warmup_requests),
                  "--output-file", out_file, "--output-details", "--disable-tqdm",
                  "--tag", f"{workload}-c{concurrency}"]


def _stub_datasets() -> None:
    """``sglang.benchmark.serving`` imports HuggingFace ``datasets`` at module level (its MMMU loader) although the
    random-ids dataset never uses it; where it is not installed a stand-in lets the module load."""
    import importlib.util
    import types

    if importlib.util.find_spec("datasets") is None:
        def load_dataset(*args, **kwargs):
            raise ModuleNotFoundError("HuggingFace 'datasets' is not installed")

        mod = types.ModuleType("datasets")
        mod.load_dataset = load_dataset
        sys.modules["datasets"] = mod


def client_main(argv: list[str]) -> int:
    """``--client [--lengths FILE] -- BENCH_SERVING_ARGS``: SGLang's bench_serving with its own arguments; with
    ``--lengths`` (JSON: lengths, output_len, vocab, seed) its dataset is replaced by prompts of random ids of
    those lengths (the mixed workload), everything else (sending, timing, metrics, output file) is its own."""
    p = argparse.ArgumentParser(prog="bench_serve.py --client")
    p.add_argument("--lengths", default=None)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    # the repository root holds a folder named kernels/, which would shadow the package of that name SGLang imports
    sys.path[:] = [x for x in sys.path if os.path.abspath(x or os.getcwd()) != ROOT]
    _stub_datasets()
    import sglang.benchmark.serving as bs

    if a.lengths:
        with open(a.lengths) as f:
            spec = json.load(f)
        from sglang.benchmark.datasets import DatasetRow

        def get_dataset(args, tokenizer, model_id=None):
            rng = random.Random(spec["seed"])
            hi = spec["vocab"] - 100
            return [DatasetRow(prompt=[rng.randrange(100, hi) for _ in range(n)], prompt_len=n,
                               output_len=spec["output_len"]) for n in spec["lengths"]]

        bs.get_dataset = get_dataset
    sys.argv = ["sglang.benchmark.serving", *rest]
    bs.cli_main()
    return 0


# ------------------------------------------------------------------------------------------------ server side
_DECODE_LINE = re.compile(r"Decode batch(?: \[\d+\])?, #running-req: (\d+)")
_QUEUE = re.compile(r"#queue-req: (\d+)")
_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{([^}]*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def decoding_at_once(log_text: str) -> dict:
    """Requests in SGLang's decode batches (its ``Decode batch, #running-req: N`` lines) and the queue beside them."""
    running, queued = [], []
    for line in log_text.splitlines():
        m = _DECODE_LINE.search(line)
        if m:
            running.append(int(m.group(1)))
            q = _QUEUE.search(line)
            if q:
                queued.append(int(q.group(1)))
    return {"max": max(running, default=None), "median": statistics.median(running) if running else None,
            "lines": len(running), "queue_max": max(queued, default=None)}


def metric(text: str, name: str, **labels: str) -> float | None:
    """Sum of the Prometheus samples of ``name`` whose labels include ``labels``; per-priority breakdowns
    (``priority="<n>"``) are left out. None if there is no such sample."""
    total, seen = 0.0, False
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        lab = dict(_LABEL.findall(m.group(2) or ""))
        if lab.get("priority", "") != "" or any(lab.get(k) != v for k, v in labels.items()):
            continue
        try:
            total += float(m.group(3))
        except ValueError:
            continue
        seen = True
    return total if seen else None


FREEKV_COUNTERS = {"checks": ("sglang:freekv_correction_checks_total", {}),
                   "corrected": ("sglang:freekv_corrected_heads_total", {}),
                   "steps_sparse": ("sglang:freekv_decode_request_steps_total", {"mode": "sparse"}),
                   "steps_dense": ("sglang:freekv_decode_request_steps_total", {"mode": "dense"}),
                   "bytes_speculative": ("sglang:freekv_recalled_bytes_total", {"path": "speculative"}),
                   "bytes_critical": ("sglang:freekv_recalled_bytes_total", {"path": "critical"})}


def freekv_counters(text: str) -> dict:
    return {k: metric(text, name, **lab) for k, (name, lab) in FREEKV_COUNTERS.items()}


def freekv_delta(before: dict, after: dict) -> dict | None:
    """FreeKV's figures over a cell from its counters before and after: corrected share of (layer, KV head)
    checks, recall MiB per request-step (speculative, critical). None where the server has no such counters."""
    d = {k: (after.get(k) or 0.0) - (before.get(k) or 0.0) for k in FREEKV_COUNTERS if after.get(k) is not None}
    if not d.get("checks"):
        return None
    steps = d.get("steps_sparse", 0.0) + d.get("steps_dense", 0.0)
    mib = {p: (d.get(f"bytes_{p}", 0.0) / steps / 2**20 if steps else None) for p in ("speculative", "critical")}
    return {"corrected_share": d.get("corrected", 0.0) / d["checks"], "checks": d["checks"], "request_steps": steps,
            "recall_mib_per_request_step": mib}


class MetricsPoller:
    """Polls ``/metrics`` every ``period`` seconds in a thread for the peak running and queued requests."""

    def __init__(self, srv, period: float = 0.5):
        self.srv, self.period = srv, period
        self.running_max = self.queue_max = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                text = self.srv.metrics()
            except OSError:
                text = ""
            for attr, name in (("running_max", "sglang:num_running_reqs"), ("queue_max", "sglang:num_queue_reqs")):
                v = metric(text, name)
                if v is not None:
                    setattr(self, attr, max(v, getattr(self, attr) or 0.0))
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------------------------ provenance
def available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return host()["ram_gib"]


def provenance(a, argv: list[str]) -> dict:
    return record("launch/bench_serve.py", argv, a.commit)


# ------------------------------------------------------------------------------------------------ driver
def host_gb(a) -> float:
    """FreeKV's host tier: ``--host-gb``, or (``auto``) 60% of the memory available now, whole GiB."""
    if a.host_gb != "auto":
        return float(a.host_gb)
    return float(max(8, math.floor(0.6 * available_gib())))


def locality_env(a) -> dict[str, str]:
    """The synthetic-locality variables every FreeKV server of this run gets."""
    if a.query_cosine is not None:
        return {"FREEKV_BENCH_QUERY_COSINE": str(a.query_cosine), "FREEKV_LOG_STATS_EVERY": "0"}
    if a.locality == "none":
        return {"FREEKV_LOG_STATS_EVERY": "0"}
    return {"FREEKV_BENCH_LOCALITY": a.locality, "FREEKV_LOG_STATS_EVERY": "0"}


def locality_label(a) -> str:
    if a.query_cosine is not None:
        return f"synthetic consecutive-query cosine {a.query_cosine} (fixed; 0.95 is the optimistic setting)"
    if a.locality == "none":
        return "the dummy model's own queries (every query unrelated to the last: FreeKV's worst case)"
    return f"calibrated synthetic locality ({a.locality.split(':', 1)[1]})"


def server_args(mode: str, a) -> list[str]:
    """The ``sglang.launch_server`` arguments of ``mode`` (without host and port)."""
    m = MODES[mode]
    top = max(a.concurrency)
    args = ["--model-path", a.model, "--load-format", "dummy", *m.args, "--max-running-requests", str(top),
            "--cuda-graph-max-bs", str(min(top, a.cuda_graph_max_bs) if a.cuda_graph_max_bs else top),
            "--enable-metrics"]
    if m.freekv:
        args += ["--freekv-host-memory-gb", f"{host_gb(a):g}", *shlex.split(a.freekv_args)]
    return args + shlex.split(a.server_args)


def server_env(mode: str, a) -> dict[str, str]:
    m = MODES[mode]
    return {**m.env, **(locality_env(a) if m.freekv else {})}


def cells(a) -> list[tuple[str, int]]:
    return [(w, c) for w in a.workloads for c in a.concurrency]


def cell_path(a, mode: str, workload: str, concurrency: int) -> str:
    return os.path.join(a.out, "cells", f"{mode}--{workload}--c{concurrency}.json")


def load_cell(path: str) -> dict | None:
    """A measured cell kept by an earlier invocation (cells with an error are measured again)."""
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return None if "error" in rec else rec


def prefill_estimate_s(tokens: int) -> float:
    return tokens / PREFILL_TOKENS_PER_S * (1.0 + tokens / 131072)


def estimate_cell_s(lengths: list[int], concurrency: int, output_len: int) -> float:
    waves = math.ceil(len(lengths) / concurrency)
    return sum(map(prefill_estimate_s, lengths)) + waves * output_len * DECODE_STEP_S + 10.0


def estimate_seconds(a) -> float:
    """A rough duration of the run (:data:`START_S` per server, :func:`estimate_cell_s` per cell)."""
    per_mode = START_S + sum(estimate_cell_s(prompt_lengths(a, w, c), c, a.output_len) for w, c in cells(a))
    warm = sum(prefill_estimate_s(max(prompt_lengths(a, w, max(a.concurrency)))) for w in a.workloads)
    return len(a.modes) * (per_mode + warm)


class Budget:
    """Seconds left of ``--budget-s`` (unbounded without one)."""

    def __init__(self, seconds: float | None):
        self.seconds, self.t0 = seconds, time.monotonic()

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - (time.monotonic() - self.t0)


BENCH_KEYS = ("completed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
              "output_throughput", "total_throughput", "median_ttft_ms", "p99_ttft_ms", "mean_ttft_ms",
              "median_itl_ms", "p99_itl_ms", "mean_itl_ms", "median_tpot_ms", "p99_tpot_ms", "median_e2e_latency_ms",
              "p99_e2e_latency_ms", "max_concurrent_requests", "concurrency", "max_output_tokens_per_s")


def read_bench_result(path: str) -> dict:
    """The last JSON line bench_serving appended to ``path``: the figures of :data:`BENCH_KEYS`, failed requests
    and up to five distinct error messages."""
    with open(path) as f:
        lines = [x for x in f.read().splitlines() if x.strip()]
    if not lines:
        raise ValueError(f"bench_serving wrote nothing to {path}")
    raw = json.loads(lines[-1])
    errors = [e for e in raw.get("errors") or [] if e]
    samples = list(dict.fromkeys(e.strip().splitlines()[-1][:300] for e in errors))[:5]
    out = {k: raw.get(k) for k in BENCH_KEYS}
    out["failed"] = max(len(errors), len(raw.get("errors") or []) - (raw.get("completed") or 0))
    out["error_samples"] = samples
    return out


def run_cell(srv, a, mode: str, workload: str, concurrency: int, budget: Budget) -> dict:
    """One bench_serving run against the running server ``srv``; the cell's record."""
    lengths = prompt_lengths(a, workload, concurrency)
    tag = f"{mode}--{workload}--c{concurrency}"
    os.makedirs(os.path.join(a.out, "cells"), exist_ok=True)
    out_file = os.path.join(a.out, "cells", f"{tag}.bench.jsonl")
    if os.path.exists(out_file):
        os.remove(out_file)  # bench_serving appends
    lengths_file = None
    if workload != "32k":
        lengths_file = os.path.join(a.out, "cells", f"{workload}-c{concurrency}.lengths.json")
        with open(lengths_file, "w") as f:
            json.dump({"lengths": lengths, "output_len": a.output_len, "vocab": a.vocab,
                       "seed": cell_seed(a, workload, concurrency)}, f)
    cmd = client_command(a, workload, concurrency, out_file, lengths_file)
    rec = {"mode": mode, "workload": workload, "concurrency": concurrency, "num_prompts": len(lengths),
           "prompt_lengths": length_summary(lengths), "output_len": a.output_len,
           "client_command": shlex.join(cmd)}
    flush_cache(srv)  # no prefix of an earlier cell is reused
    log_start = os.path.getsize(srv.log_path) if os.path.exists(srv.log_path) else 0
    before = freekv_counters(srv.metrics())
    timeout = min(a.cell_timeout, budget.left() - 30.0)
    t0 = time.time()
    with MetricsPoller(srv) as poll, open(os.path.join(a.out, "cells", f"{tag}.client.log"), "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=max(timeout, 1.0)).returncode
        except subprocess.TimeoutExpired:
            rc = None
    rec["seconds"] = round(time.time() - t0, 1)
    with open(srv.log_path, errors="replace") as f:
        f.seek(log_start)
        rec["decoding"] = decoding_at_once(f.read())
    rec["decoding"]["metrics_running_max"] = poll.running_max
    rec["decoding"]["metrics_queue_max"] = poll.queue_max
    rec["freekv"] = freekv_delta(before, freekv_counters(srv.metrics())) if MODES[mode].freekv else None
    if rc is None:
        rec["error"] = f"bench_serving stopped after {timeout:.0f} s (--cell-timeout or --budget-s)"
    elif rc != 0:
        rec["error"] = f"bench_serving exited with {rc} (see {tag}.client.log)"
    else:
        try:
            rec["bench"] = read_bench_result(out_file)
        except (OSError, ValueError) as e:
            rec["error"] = f"{type(e).__name__}: {e}"
    if srv.proc is not None and srv.proc.poll() is not None:
        rec["error"] = rec.get("error", "") + f" (server exited with {srv.proc.returncode})"
    return rec


def warm_up(srv, a) -> None:
    """One untimed request of each workload's longest prompt (first-use costs: kernel compiles, the first long
    prefill); each cell flushes the prefix cache before it starts."""
    rng = random.Random(a.seed)
    for w in a.workloads:
        n = max(prompt_lengths(a, w, max(a.concurrency)))
        srv.generate([rng.randrange(100, a.vocab - 100) for _ in range(n)], 8, timeout=a.cell_timeout)


def flush_cache(srv, tries: int = 15) -> None:
    """SGLang's ``POST /flush_cache``, which refuses (400) while a request is still running or queued: retried
    every 2 s."""
    import urllib.error
    import urllib.request

    for i in range(tries):
        req = urllib.request.Request(srv.base + "/flush_cache", data=b"", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                r.read()
            return
        except urllib.error.HTTPError as e:
            if e.code != 400 or i == tries - 1:
                raise
        time.sleep(2.0)


def run_mode(mode: str, a, prov: dict, budget: Budget, start: int) -> list[dict]:
    """Every pending cell of ``mode`` on one server (cells kept from an earlier invocation are reused)."""
    out, pending = [], []
    for w, c in cells(a):
        kept = load_cell(cell_path(a, mode, w, c))
        if kept:
            out.append(kept)
        else:
            pending.append((w, c))
    if not pending:
        return out
    base = {"card": prov["card"], "commit": prov["commit"]}
    if budget.left() < MIN_START_LEFT_S:
        return out + [{"mode": mode, "workload": w, "concurrency": c, "not_run": "budget", **base} for w, c in pending]
    log_path = os.path.join(a.out, f"serve-{mode}-{start}.log")
    srv = Server(server_args(mode, a), port=a.port, log_path=log_path,
                 start_timeout=max(60.0, min(a.start_timeout, budget.left() - MIN_CELL_LEFT_S)),
                 env=server_env(mode, a))
    t0 = time.time()
    try:
        with srv:
            ready = round(time.time() - t0, 1)
            print(f"[serve] {mode}: ready after {ready} s", flush=True)
            warm_up(srv, a)
            for w, c in pending:
                if budget.left() < MIN_CELL_LEFT_S:
                    out.append({"mode": mode, "workload": w, "concurrency": c, "not_run": "budget", **base})
                    continue
                rec = {**run_cell(srv, a, mode, w, c, budget), **base, "server_log": os.path.basename(log_path),
                       "server_ready_s": ready}
                with open(cell_path(a, mode, w, c), "w") as f:
                    json.dump(rec, f, indent=1)
                out.append(rec)
                print(f"[serve] {mode} {w} c{c}: {summary_line(rec)}", flush=True)
    except Exception as e:  # noqa: BLE001 - a server that does not start or dies: report it, go on
        err = f"{type(e).__name__}: {str(e)[:400]}"
        print(f"[serve] {mode}: {err}", flush=True)
        done = {(r["workload"], r["concurrency"]) for r in out}
        out += [{"mode": mode, "workload": w, "concurrency": c, "error": err, **base} for w, c in pending
                if (w, c) not in done]
    return out


def summary_line(rec: dict) -> str:
    if "error" in rec:
        return "error: " + rec["error"]
    b = rec["bench"]
    return (f"{b['output_throughput']:.0f} output tok/s, TTFT p50 {b['median_ttft_ms']:.0f} ms, ITL p50 "
            f"{b['median_itl_ms']:.1f} ms, decoding at once max {rec['decoding']['max']}, failed {b['failed']}")


# ------------------------------------------------------------------------------------------------ report
def _num(x, fmt: str = "{:.0f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def throughput(rows: list[dict]) -> dict:
    """(mode, workload, concurrency) -> output tokens/s of the cells that measured one."""
    return {(r["mode"], r["workload"], r["concurrency"]): r["bench"]["output_throughput"]
            for r in rows if r.get("bench") and r["bench"].get("output_throughput")}


def report(rows: list[dict], a, prov: dict) -> str:
    """Markdown: the run's provenance, one table per workload, ratios to dense and dense-fp8."""
    tput = throughput(rows)
    cards = sorted({r.get("card") for r in rows if r.get("card")})
    lines = [f"card: {prov['card']}; host: {prov['host']['cpus']} CPUs, {prov['host']['ram_gib']} GiB RAM; "
             f"commit {prov['commit']}; " + ", ".join(f"{k} {v}" for k, v in prov["versions"].items()), "",
             f"model: {a.model} (dummy weights); output {a.output_len} tokens; FreeKV host tier {host_gb(a):g} GiB"
             + (f", FreeKV flags `{a.freekv_args}`" if a.freekv_args else "")
             + (f", server flags `{a.server_args}`" if a.server_args else "")
             + f"; FreeKV query locality: {locality_label(a)}", "",
             f"command: `{prov['command']}`"]
    if len(cards) > 1:
        lines += ["", f"**Cells from different cards: {', '.join(cards)}** (compare within one card only)"]
    for w in a.workloads:
        desc = (f"{a.input_len}-token prompts" if w == "32k"
                else f"prompt lengths log-uniform {a.mixed_min}-{a.mixed_max} tokens")
        lines += ["", f"### {w}: {desc}, {a.output_len} output tokens", "",
                  "| mode | concurrency | prompts | output tok/s | vs dense | vs dense-fp8 | TTFT p50 / p99 ms | "
                  "ITL p50 / p99 ms | decoding at once max (median) | queued max | failed | corrected share | "
                  "recall MiB/request-step (spec. / critical) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in a.concurrency:
            for m in a.modes:
                r = next((x for x in rows if (x["mode"], x["workload"], x["concurrency"]) == (m, w, c)), None)
                if r is None:
                    continue
                if "bench" not in r:
                    why = r.get("error") or f"not run ({r.get('not_run')})"
                    lines.append(f"| {m} | {c} | | {why[:200]} | | | | | | | | | |")
                    continue
                b, d, fk = r["bench"], r["decoding"], r.get("freekv") or {}
                t = b["output_throughput"]

                def vs(base):
                    ref = tput.get((base, w, c))
                    return f"{t / ref:.2f}x" if ref and t else "-"

                dec = f"{_num(d.get('max'))} ({_num(d.get('median'), '{:g}')})"
                if d.get("max") is None and d.get("metrics_running_max") is not None:
                    dec = f"{d['metrics_running_max']:.0f} (/metrics)"
                mib = fk.get("recall_mib_per_request_step") or {}
                lines.append(
                    f"| {m} | {c} | {r['num_prompts']} | {_num(t)} | {vs('dense')} | {vs('dense-fp8')} | "
                    f"{_num(b['median_ttft_ms'])} / {_num(b['p99_ttft_ms'])} | "
                    f"{_num(b['median_itl_ms'], '{:.1f}')} / {_num(b['p99_itl_ms'], '{:.1f}')} | {dec} | "
                    f"{_num(d['queue_max'] if d.get('queue_max') is not None else d.get('metrics_queue_max'))} | "
                    f"{b['failed']} | "
                    f"{_num(fk.get('corrected_share'), '{:.1%}')} | "
                    f"{_num(mib.get('speculative'), '{:.1f}')} / {_num(mib.get('critical'), '{:.1f}')} |")
    lines += ["", "decoding at once: requests in SGLang's decode batches during the cell (its log lines); queued: "
              "requests waiting beside them; corrected share and recall: FreeKV's counters over the cell."]
    return "\n".join(lines)


def plot(rows: list[dict], a, prov: dict, path: str) -> str:
    """Output tokens/s vs concurrency, a panel per workload, a line per mode; a message if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib, then rerun with the same --out)"
    tput = throughput(rows)
    fig, axes = plt.subplots(1, len(a.workloads), figsize=(5.5 * len(a.workloads), 4), squeeze=False)
    for ax, w in zip(axes[0], a.workloads):
        for i, m in enumerate(a.modes):
            pts = sorted((c, tput[(m, w, c)]) for c in a.concurrency if (m, w, c) in tput)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m, color=f"C{i % 10}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(a.concurrency, [str(c) for c in a.concurrency])
        ax.set_title(f"{w}: {a.input_len}-token prompts" if w == "32k" else
                     f"{w}: {a.mixed_min}-{a.mixed_max}-token prompts")
        ax.set_xlabel("concurrency (bench_serving --max-concurrency)")
        ax.set_ylabel(f"output tokens/s ({a.output_len} per request)")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.suptitle(f"{prov['card']}, commit {prov['commit']}, FreeKV: {locality_label(a)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"wrote {path}"


# ------------------------------------------------------------------------------------------------ options
def _locality(spec: str) -> str:
    if spec == "none":
        return spec
    from bench_variants import locality_spec

    try:
        return locality_spec(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=".gpu-bundle/models/llama-8b-shape")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--workloads", nargs="+", default=None, choices=WORKLOADS, help="default: both (--quick: 32k)")
    p.add_argument("--concurrency", type=int, nargs="+", default=None, help="default 4 16 64 (--quick: 4 16)")
    p.add_argument("--prompts-per-slot", type=float, default=None,
                   help="prompts per concurrency slot (default 2; --quick: 1)")
    p.add_argument("--min-prompts", type=int, default=4)
    p.add_argument("--input-len", type=int, default=32000, help="prompt tokens of the 32k workload")
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--mixed-min", type=int, default=4096)
    p.add_argument("--mixed-max", type=int, default=130048, help="prompt + output within the model's 131072")
    p.add_argument("--vocab", type=int, default=49152, help="token ids of the mixed prompts are drawn below this")
    p.add_argument("--host-gb", default="auto", help="FreeKV host tier, GiB (auto: 60%% of the available memory)")
    loc = p.add_mutually_exclusive_group()
    loc.add_argument("--locality", default="calibrated", type=_locality, metavar="calibrated[:PATH]|none",
                     help="FreeKV modes: synthetic query locality (default: the calibrated one)")
    loc.add_argument("--query-cosine", type=float, default=None,
                     help="FreeKV modes: a fixed synthetic consecutive-query cosine instead")
    p.add_argument("--freekv-args", default="", help="extra flags of the FreeKV servers, one string "
                                                     "(e.g. '--freekv-kv-storage fp8_e4m3 --freekv-gpu-tier-gb 30')")
    p.add_argument("--server-args", default="", help="extra flags of every server, one string")
    p.add_argument("--cuda-graph-max-bs", type=int, default=None, help="default: the top concurrency")
    p.add_argument("--warmup-requests", type=int, default=0,
                   help="bench_serving's own warm-up requests per cell (their prompt is the cell's first, whose "
                        "prefix the radix cache then holds; each server is warmed up once before its cells)")
    p.add_argument("--quick", action="store_true", help="32k at concurrency 4 and 16, one prompt per slot, "
                                                        "540 s budget")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting servers and cells past this "
                                                                "(--quick: 540)")
    p.add_argument("--cell-timeout", type=float, default=3600.0)
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--port", type=int, default=30041)
    p.add_argument("--commit", default=None, help="the commit under test, where git is not available")
    p.add_argument("--dry-run", action="store_true", help="print the plan, the servers' flags and the estimate")
    p.add_argument("--out", default="serve-out")
    a = p.parse_args(argv)
    defaults = QUICK if a.quick else {"workloads": list(WORKLOADS), "concurrency": [4, 16, 64],
                                      "prompts_per_slot": 2.0, "budget_s": None}
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if any(c < 1 for c in a.concurrency) or a.prompts_per_slot <= 0:
        p.error("concurrency and --prompts-per-slot must be positive")
    if not 0 < a.mixed_min <= a.mixed_max:
        p.error("--mixed-min must be positive and at most --mixed-max")
    if a.host_gb != "auto":
        try:
            float(a.host_gb)
        except ValueError:
            p.error(f"--host-gb takes a number of GiB or auto, got {a.host_gb!r}")
    return a


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--client"]:
        return client_main(argv[1:])
    a = parse_args(argv)
    prov = provenance(a, argv)
    est = estimate_seconds(a)
    print(f"[serve] modes {' '.join(a.modes)}; workloads {' '.join(a.workloads)}; concurrency "
          f"{' '.join(map(str, a.concurrency))}; estimate about {est / 60:.0f} min"
          + (f" (budget {a.budget_s:.0f} s)" if a.budget_s else ""), flush=True)
    if a.dry_run:
        for m in a.modes:
            env = server_env(m, a)
            print(f"{m}: {' '.join(f'{k}={v}' for k, v in env.items())} python -m sglang.launch_server "
                  f"{shlex.join(server_args(m, a))}")
        for w, c in cells(a):
            print(f"{w} c{c}: {length_summary(prompt_lengths(a, w, c))}")
        return 0
    os.makedirs(os.path.join(a.out, "cells"), exist_ok=True)
    budget = Budget(a.budget_s)
    start = int(time.time())
    rows: list[dict] = []
    for mode in a.modes:
        rows += run_mode(mode, a, prov, budget, start)
        with open(os.path.join(a.out, "bench_serve.json"), "w") as f:
            json.dump({**prov, "args": vars(a), "estimate_s": round(est), "modes": {m: MODES[m].label for m in a.modes},
                       "results": rows}, f, indent=1)
    text = report(rows, a, prov)
    with open(os.path.join(a.out, "bench_serve.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(plot(rows, a, prov, os.path.join(a.out, "bench_serve.png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
