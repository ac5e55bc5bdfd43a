"""How many long requests run at once: dense SGLang vs FreeKV, on one GPU, in one invocation.

For each mode a stock ``sglang.launch_server`` starts with its normal memory settings (dense:
the default static memory fraction, whole KV on the GPU; FreeKV: the same fraction plus a host
tier of ``--host-gb``). The script reads the token capacity the server reports, submits more
``--context``-token requests than either mode can hold at once, and reports the largest number of
requests the server ran concurrently (from its decode log lines), with the capacity computed from
its pools. FreeKV holds every request's whole KV in host memory, so its capacity is bounded by
the host tier (``--host-gb``, at most the machine's RAM) as well as by its GPU working sets.

Usage (GPU machine, repo root):
  python launch/bench_capacity.py --model .gpu-bundle/models/llama-8b-shape --context 32000 --host-gb 100
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from freekv_sglang.serving import Server, output_ids  # noqa: E402

MODES = {
    "dense": ["--attention-backend", "flashinfer"],
    # dense with an FP8 KV pool: the like-for-like baseline for FreeKV's FP8 tiers
    "dense-fp8": ["--attention-backend", "flashinfer", "--kv-cache-dtype", "fp8_e4m3"],
    "freekv": ["--kv-retrieval", "freekv"],
    "freekv-tier": ["--kv-retrieval", "freekv"],  # plus --freekv-gpu-tier-gb (--gpu-tier-gb)
    "freekv-fp8": ["--kv-retrieval", "freekv", "--freekv-kv-storage", "fp8_e4m3"],
    "freekv-fp8-tier": ["--kv-retrieval", "freekv", "--freekv-kv-storage", "fp8_e4m3"],  # plus the GPU tier
}


def _log_matches(log_path: str, pattern: str) -> list[re.Match]:
    """Matches of ``pattern`` (``re.search``) in a server log, line by line, in order; none if the log
    does not exist."""
    try:
        with open(log_path, errors="replace") as f:
            return [m for m in map(re.compile(pattern).search, f) if m]
    except OSError:
        return []


def peak_running(log_path: str) -> int:
    """The most requests SGLang's decode log lines show running at once."""
    return max((int(m.group(1)) for m in _log_matches(log_path, r"Decode batch(?: \[\d+\])?, #running-req: (\d+)")),
               default=0)


def computed_concurrent(token_capacity: int | None, max_running: int | None, request_tokens: int) -> int | None:
    """Requests of ``request_tokens`` tokens the server can run at once by its own limits: the token
    capacity it reports (host tier plus GPU tier for FreeKV) and its ``max_running_requests`` (for
    FreeKV, the working sets that fit beside the digests and the GPU tier)."""
    if not token_capacity:
        return None
    by_tokens = token_capacity // request_tokens
    return min(by_tokens, max_running) if max_running else by_tokens


def scheduler_max_running(log_path: str) -> int | None:
    """``max_running_requests`` as SGLang's scheduler settled it at start-up (its log line), which for
    FreeKV is the plan's working-set bound rather than the command-line cap ``/get_server_info`` reports."""
    found = _log_matches(log_path, r"max_total_num_tokens=\d+, .*max_running_requests=(\d+)")
    return int(found[-1].group(1)) if found else None


def server_failure(log_path: str) -> str | None:
    """The last exception line a server log shows (``torch.AcceleratorError: CUDA error: ...``), or None."""
    found = _log_matches(log_path, r"^[\w.]*(Error|Exception)\b.*:")  # unindented: not a traceback's code line
    return found[-1].string.strip() if found else None


def run(mode: str, a) -> dict:
    args = ["--model-path", a.model, "--load-format", "dummy", *MODES[mode], "--max-running-requests",
            str(a.max_requests)]
    if mode.startswith("freekv"):
        args += ["--freekv-host-memory-gb", str(a.host_gb)]
    if mode.endswith("-tier"):
        if not a.gpu_tier_gb:
            raise ValueError("mode freekv-tier needs --gpu-tier-gb (launch/capacity_plan.py suggests a size)")
        args += ["--freekv-gpu-tier-gb", str(a.gpu_tier_gb)]
    # a large host tier takes minutes to page-lock at start-up (docs/TUNING.md, FREEKV_HOST_ALLOC)
    srv = Server(args, port=a.port, log_path=os.path.join(a.out, f"capacity-{mode}.log"),
                 start_timeout=max(300.0, min(a.timeout, 900.0)))
    rng = random.Random(0)
    with srv:
        info = srv.server_info()
        cap_tokens = info.get("max_total_num_tokens")
        running_cap = scheduler_max_running(srv.log_path) or info.get("max_running_requests")
        computed = computed_concurrent(cap_tokens, running_cap, a.context + a.new_tokens)
        n = min(a.max_requests, (computed or a.max_requests) + 2)
        prompts = [[rng.randrange(100, 49000) for _ in range(a.context)] for _ in range(n)]
        t0 = time.time()
        res = srv.generate_many(prompts, a.new_tokens, timeout=a.timeout)
        ok = sum(len(output_ids(r)) == a.new_tokens for r in res)
        dt = time.time() - t0
    mem = [m.group(0).strip() for m in _log_matches(srv.log_path, r"FreeKV memory: .*")]
    return {"mode": mode, "token_capacity": cap_tokens, "max_running_requests": running_cap,
            "computed_concurrent": computed, "submitted": n, "completed": ok,
            "peak_running": peak_running(srv.log_path), "seconds": round(dt, 1),
            "freekv_memory": mem[-1] if mem else None}


def table(rows: list[dict], context: int) -> str:
    """Markdown table of :func:`run` results (rows with ``error`` shown as such) and the FreeKV / dense ratio."""
    lines = [f"| mode | token capacity | concurrent {context}-token requests (computed) | peak running (measured) "
             f"| completed/submitted |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | error: {r['error'][:240]} | | | |")
        else:
            lines.append(f"| {r['mode']} | {r['token_capacity']} | {r['computed_concurrent']} | {r['peak_running']} | "
                         f"{r['completed']}/{r['submitted']} |")
    by = {r["mode"]: r for r in rows if "error" not in r}
    for m in ("freekv", "freekv-tier", "freekv-fp8", "freekv-fp8-tier"):
        for base in ("dense", "dense-fp8"):
            if by.get(base, {}).get("peak_running") and m in by:
                lines.append(f"\n{m} / {base} concurrent {context}-token requests: "
                             f"{by[m]['peak_running'] / by[base]['peak_running']:.2f}x")
    return "\n".join(lines)


def run_or_error(mode: str, a) -> dict:
    """:func:`run`, or the mode's error (the other modes still run)."""
    try:
        return run(mode, a)
    except Exception as e:  # noqa: BLE001 - reported in the table
        cause = server_failure(os.path.join(a.out, f"capacity-{mode}.log"))
        return {"mode": mode, "error": f"{type(e).__name__}: {e}" + (f" (server: {cause})" if cause else "")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=".gpu-bundle/models/llama-8b-shape")
    p.add_argument("--context", type=int, default=32000)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--host-gb", type=float, default=100.0)
    p.add_argument("--max-requests", type=int, default=64)
    p.add_argument("--timeout", type=float, default=1200.0)
    p.add_argument("--port", type=int, default=30021)
    p.add_argument("--gpu-tier-gb", type=float, default=0.0, help="--freekv-gpu-tier-gb of mode freekv-tier")
    p.add_argument("--modes", nargs="+", default=["dense", "freekv"], choices=list(MODES))
    p.add_argument("--out", default="bench-out")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    rows = []
    for m in a.modes:  # the file is rewritten after each mode: a run cut short keeps what it measured
        rows.append(run_or_error(m, a))
        with open(os.path.join(a.out, "bench_capacity.json"), "w") as f:
            json.dump({"card": card, "args": vars(a), "results": rows}, f, indent=1)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"card: {card}; host RAM {ram:.0f} GiB; context {a.context} + {a.new_tokens} new tokens; "
          f"FreeKV host tier {a.host_gb} GiB" + (f", GPU tier {a.gpu_tier_gb} GiB" if a.gpu_tier_gb else "") + "\n")
    for r in rows:
        if r.get("freekv_memory"):
            print(r["freekv_memory"])
    print(table(rows, a.context))


if __name__ == "__main__":
    main()
