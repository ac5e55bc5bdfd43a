"""Prefix reuse and chunked prefill, served end to end: FreeKV with SGLang's radix cache against FreeKV
recomputing every prefix and against dense SGLang with its own radix cache.

Sections (``--sections``, each mode a stock ``python -m sglang.launch_server`` started in turn):

* ``followup``: time to first token of a follow-up request, ``--prefix`` cached tokens + ``--new`` new
  ones (after one request of the prefix alone; ``max_new_tokens`` 1, median of ``--repeats`` fresh
  prefixes): FreeKV with the radix cache (prefix from the host tier), FreeKV with ``--disable-radix-cache``
  (recomputed), dense SGLang with its radix cache (prefix in HBM).
* ``chunked``: one ``--long``-token prompt prefilled in chunks (the mode's ``--chunked-prefill-size``) vs in
  one forward (``-1``), FreeKV: its time to first token, the peak GPU memory during it (``nvidia-smi``
  polled every 50 ms, above the idle level), and the inter-token latency (p50 / p99) of ``--decoders``
  streaming requests of ``--decode-context`` tokens that decode while it is prefilled.
* ``multiturn``: ``--conversations`` conversations x ``--turns`` turns over one ``--prefix``-token document
  (each turn appends a ``--question``-token question and the previous answer, ``--answer`` new tokens):
  total time and prefill tokens computed (prompt tokens minus SGLang's ``cached_tokens``), for FreeKV
  radix on / off and dense.

Usage (GPU machine, repo root):
  python launch/bench_prefix.py --model .gpu-bundle/models/llama-8b-shape --out prefix-out
Prints one Markdown table per section and writes ``bench_prefix.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from freekv_sglang.provenance import record  # noqa: E402
from freekv_sglang.serving import Server, output_ids, write_report  # noqa: E402

SECTIONS = ("followup", "chunked", "multiturn")
FREEKV = ["--kv-retrieval", "freekv"]
DENSE = ["--attention-backend", "flashinfer"]


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab - 100) for _ in range(n)]


def percentile(xs: list[float], q: float) -> float:
    """The ``q``-quantile (0-1) of ``xs`` by nearest rank; NaN for an empty list."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


class GpuMemoryPoller:
    """Polls ``nvidia-smi`` memory.used (MiB) of GPU 0 every ``period`` seconds in a thread."""

    def __init__(self, period: float = 0.05):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                               capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip():
                self.samples.append(float(r.stdout.split()[0]))
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def stream_token_times(srv: Server, ids: list[int], new: int, out: list, started: threading.Event) -> None:
    """Stream ``/generate`` and append the arrival time of every streamed chunk to ``out``."""
    body = json.dumps({"input_ids": ids, "stream": True,
                       "sampling_params": {"max_new_tokens": new, "temperature": 0, "ignore_eos": True}})
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=1800)
    conn.request("POST", "/generate", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    for raw in resp:
        line = raw.decode(errors="replace").strip()
        if line.startswith("data:") and line != "data: [DONE]":
            out.append(time.perf_counter())
            started.set()
    conn.close()


def ttft(srv: Server, ids: list[int], timeout: float) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = srv.generate(ids, 1, timeout=timeout)
    return time.perf_counter() - t0, r


# ------------------------------------------------------------------------------------------------ sections
def followup(srv: Server, a, rng: random.Random) -> dict:
    """TTFT of ``prefix + new`` after the prefix alone was served (module docstring)."""
    srv.generate(_ids(rng, 512, a.vocab), 1, timeout=a.timeout)  # warm-up
    times, cached = [], []
    for _ in range(a.repeats):
        prefix = _ids(rng, a.prefix, a.vocab)
        srv.generate(prefix, 1, timeout=a.timeout)
        t, r = ttft(srv, prefix + _ids(rng, a.new, a.vocab), a.timeout)
        times.append(t)
        cached.append(r.get("meta_info", {}).get("cached_tokens"))
    states = srv.server_info().get("internal_states") or [{}]
    staged = (states[0].get("freekv") or {}).get("prefix_staged_bytes")  # FreeKV: bytes by copy path
    return {"ttft_s": statistics.median(times), "ttft_all_s": times, "cached_tokens": cached,
            **({"prefix_staged_bytes": staged} if staged else {})}


def chunked(srv: Server, a, rng: random.Random) -> dict:
    """TTFT, peak GPU memory and decoders' inter-token latency while one long prompt is prefilled."""
    srv.generate(_ids(rng, 512, a.vocab), 1, timeout=a.timeout)
    idle = GpuMemoryPoller()
    with idle:
        time.sleep(0.5)
    times = [[] for _ in range(a.decoders)]
    started = [threading.Event() for _ in range(a.decoders)]
    threads = [threading.Thread(target=stream_token_times, args=(srv, _ids(rng, a.decode_context, a.vocab),
                                                                  a.decode_tokens, times[i], started[i]))
               for i in range(a.decoders)]
    for t in threads:
        t.start()
    for e in started:
        e.wait(a.timeout)
    time.sleep(1.0)  # steady decoding before the long prompt arrives
    with GpuMemoryPoller() as mem:
        t0 = time.perf_counter()
        srv.generate(_ids(rng, a.long, a.vocab), 1, timeout=a.timeout)
        t1 = time.perf_counter()
    for t in threads:
        t.join()
    during = [y - x for ts in times for x, y in zip(ts, ts[1:]) if y >= t0 and x <= t1]  # gaps overlapping it
    overall = [y - x for ts in times for x, y in zip(ts, ts[1:])]
    base = max(idle.samples) if idle.samples else float("nan")
    return {"ttft_s": t1 - t0, "peak_extra_mib": (max(mem.samples) - base) if mem.samples else None,
            "itl_during_ms": {"p50": 1000 * percentile(during, 0.5), "p99": 1000 * percentile(during, 0.99),
                              "max": 1000 * max(during, default=float("nan")), "n": len(during)},
            "itl_overall_ms": {"p50": 1000 * percentile(overall, 0.5), "p99": 1000 * percentile(overall, 0.99),
                               "n": len(overall)}}


def multiturn(srv: Server, a, rng: random.Random) -> dict:
    """Total time and prefill tokens computed over the conversations (module docstring)."""
    from concurrent.futures import ThreadPoolExecutor

    doc = _ids(rng, a.prefix, a.vocab)
    questions = [[_ids(rng, a.question, a.vocab) for _ in range(a.turns)] for _ in range(a.conversations)]

    def conversation(c: int) -> tuple[int, int]:
        history, prompt_tokens, computed = list(doc), 0, 0
        for turn in range(a.turns):
            history += questions[c][turn]
            r = srv.generate(history, a.answer, timeout=a.timeout)
            prompt_tokens += len(history)
            computed += len(history) - int(r.get("meta_info", {}).get("cached_tokens") or 0)
            history += output_ids(r)
        return prompt_tokens, computed

    srv.generate(_ids(rng, 512, a.vocab), 1, timeout=a.timeout)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(a.conversations) as ex:
        res = list(ex.map(conversation, range(a.conversations)))
    return {"total_s": time.perf_counter() - t0, "prompt_tokens": sum(r[0] for r in res),
            "prefill_tokens_computed": sum(r[1] for r in res)}


# ------------------------------------------------------------------------------------------------ driver
def modes_for(section: str, a) -> dict[str, list[str]]:
    host = ["--freekv-host-memory-gb", str(a.host_gb)]
    if section == "chunked":
        return {"freekv-chunked": [*FREEKV, *host],
                "freekv-one-forward": [*FREEKV, *host, "--chunked-prefill-size", "-1"]}
    return {"freekv-radix": [*FREEKV, *host], "freekv-no-radix": [*FREEKV, *host, "--disable-radix-cache"],
            "dense-radix": DENSE}


def run_section(section: str, a) -> dict:
    fn = {"followup": followup, "chunked": chunked, "multiturn": multiturn}[section]
    out = {}
    for mode, extra in modes_for(section, a).items():
        args = ["--model-path", a.model, "--load-format", "dummy", "--context-length", str(a.context_length),
                "--cuda-graph-max-bs", "16", *extra]
        srv = Server(args, port=a.port, log_path=os.path.join(a.out, f"prefix-{section}-{mode}.log"),
                     start_timeout=900)
        try:
            with srv:
                out[mode] = fn(srv, a, random.Random(zlib.crc32(f"{section}/{a.seed}".encode())))
        except Exception as e:  # noqa: BLE001 - report the mode, go on
            out[mode] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"[prefix] {section} {mode}: {json.dumps(out[mode])}", flush=True)
    return out


def report(results: dict) -> str:
    lines = []

    def ratio(x, y):
        return f"{x / y:.2f}x" if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y else "-"

    if "followup" in results:
        r = results["followup"]
        t = {m: r[m].get("ttft_s") for m in r}
        lines += ["| follow-up TTFT | s |", "|---|---:|"] + [f"| {m} | {v:.3f} |" if v else f"| {m} | - |"
                                                          for m, v in t.items()]
        lines += [f"\nFreeKV radix vs recompute: {ratio(t.get('freekv-no-radix'), t.get('freekv-radix'))} faster; "
                  f"vs dense radix: {ratio(t.get('freekv-radix'), t.get('dense-radix'))} the time\n"]
    if "chunked" in results:
        r = results["chunked"]
        lines += ["| long prompt | TTFT s | peak extra GPU MiB | decoders' ITL during it p50 / p99 ms |",
                  "|---|---:|---:|---:|"]
        for m, v in r.items():
            if "error" in v:
                lines.append(f"| {m} | error | | |")
                continue
            itl = v["itl_during_ms"]
            lines.append(f"| {m} | {v['ttft_s']:.2f} | {v['peak_extra_mib']} | {itl['p50']:.1f} / {itl['p99']:.1f} |")
        lines.append("")
    if "multiturn" in results:
        r = results["multiturn"]
        lines += ["| multi-turn | total s | prefill tokens computed / prompt tokens |", "|---|---:|---:|"]
        for m, v in r.items():
            lines.append(f"| {m} | {v.get('total_s', float('nan')):.2f} | "
                         f"{v.get('prefill_tokens_computed')} / {v.get('prompt_tokens')} |")
        tm = {m: v.get("total_s") for m, v in r.items()}
        lines.append(f"\nFreeKV radix on vs off: {ratio(tm.get('freekv-no-radix'), tm.get('freekv-radix'))} faster")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=".gpu-bundle/models/llama-8b-shape")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--prefix", type=int, default=32768, help="cached prefix / document tokens")
    p.add_argument("--new", type=int, default=256, help="new tokens of the follow-up")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--long", type=int, default=131072 - 1024, help="tokens of the long prompt (chunked)")
    p.add_argument("--decoders", type=int, default=8)
    p.add_argument("--decode-context", type=int, default=32768)
    p.add_argument("--decode-tokens", type=int, default=2048, help="enough to outlast the long prefill")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--question", type=int, default=64)
    p.add_argument("--answer", type=int, default=64)
    p.add_argument("--context-length", type=int, default=131072)
    p.add_argument("--host-gb", type=float, default=64.0)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=30031)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--out", default="prefix-out")
    p.add_argument("--commit", help="commit to record (default: the checkout's HEAD)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    prov = record("launch/bench_prefix.py", sys.argv[1:] if argv is None else list(argv), a.commit)
    results = {}
    for section in a.sections:
        results[section] = run_section(section, a)
        with open(os.path.join(a.out, "bench_prefix.json"), "w") as f:
            json.dump({"provenance": prov, "args": vars(a), "results": results}, f, indent=1)
    text = write_report(a.out, __file__, a.model, sys.argv[1:] if argv is None else list(argv), report(results))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
