"""What SGLang's overlap scheduler is worth, served end to end: dense with it (SGLang's default),
dense without it (what FreeKV runs with: the plugin turns the overlap scheduler off), and FreeKV.

Each mode starts a stock ``python -m sglang.launch_server`` on the same GPU, one after the other.
For each (context, batch) the script sends ``batch`` concurrent ``/generate`` requests of fresh
random prompts twice, once with ``--short`` and once with ``--long`` new tokens (greedy,
``ignore_eos``), and takes the decode time per step as the difference of the two wall times over
the difference in tokens: prefill, tokenization and HTTP costs cancel out. Prompts are never
repeated, so the radix cache (on in dense SGLang) does not shorten any prefill. Before the first cell
of each context one untimed request of that context warms the server up (a first long prompt pays
one-off costs that would not cancel), and ``--repeats`` pairs are measured per cell (median).

Printed last: decode ms/step per mode and cell, the cost of turning the overlap scheduler off for
dense (no-overlap time / overlap time) and FreeKV's speed-up over both dense modes.

Usage (GPU machine, repo root):
  python launch/bench_overlap.py --model .gpu-bundle/models/llama-8b-shape --contexts 32000 \\
      --batch-sizes 1 8 --query-cosine 0.95 --out overlap-out
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from freekv_sglang.serving import Server, output_ids, write_report  # noqa: E402

MODES = {
    "dense": ["--attention-backend", "flashinfer"],
    "dense-no-overlap": ["--attention-backend", "flashinfer", "--disable-overlap-schedule"],
    "freekv": ["--kv-retrieval", "freekv"],
    "freekv-overlap": ["--kv-retrieval", "freekv"],  # with the experimental opt-in below
}
MODE_ENV = {"freekv-overlap": {"FREEKV_EXPERIMENTAL_OVERLAP_SCHEDULE": "1"}}


def decode_ms_per_step(srv: Server, rng: random.Random, context: int, batch: int, short: int, long: int,
                       vocab: int, timeout: float, repeats: int = 1) -> dict:
    """Decode time per step of ``batch`` concurrent requests of ``context`` tokens (see module doc): the
    median over ``repeats`` (short, long) pairs. A pair whose long run is not slower than its short one
    (noise larger than the decode time) is an error, never a negative time."""
    pairs = []
    for _ in range(repeats):
        times = {}
        for new in (short, long):
            prompts = [[rng.randrange(100, vocab - 100) for _ in range(context)] for _ in range(batch)]
            t0 = time.perf_counter()
            res = srv.generate_many(prompts, new, timeout=timeout)
            times[new] = time.perf_counter() - t0
            got = [len(output_ids(r)) for r in res]
            if got != [new] * batch:
                raise RuntimeError(f"expected {new} tokens per request, got {got}")
        if times[long] <= times[short]:
            raise RuntimeError(f"the {long}-token run ({times[long]:.2f} s) was not slower than the {short}-token "
                               f"run ({times[short]:.2f} s): noise exceeds the decode time, raise --long")
        pairs.append((times[short], times[long], 1000 * (times[long] - times[short]) / (long - short)))
    pairs.sort(key=lambda x: x[2])
    short_s, long_s, ms = pairs[len(pairs) // 2]
    return {"context": context, "batch": batch, "short_s": short_s, "long_s": long_s, "decode_ms_per_step": ms,
            "decode_ms_per_step_all": [x[2] for x in pairs]}


def warm_up(srv: Server, rng: random.Random, context: int, new: int, vocab: int, timeout: float) -> None:
    """One untimed request of ``context`` tokens: one-off costs of a first long prompt stay out of the cells."""
    srv.generate_many([[rng.randrange(100, vocab - 100) for _ in range(context)]], new, timeout=timeout)


def _locality(spec: str) -> str:
    from bench_variants import locality_spec

    try:
        return locality_spec(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run_mode(mode: str, a) -> list[dict]:
    args = ["--model-path", a.model, "--load-format", "dummy", "--max-running-requests", str(max(a.batch_sizes)),
            "--cuda-graph-max-bs", str(max(a.batch_sizes)), *MODES[mode]]
    freekv = mode.startswith("freekv")
    if freekv:
        args += ["--freekv-host-memory-gb", str(a.host_gb)]
    srv = Server(args, port=a.port, log_path=os.path.join(a.out, f"overlap-{mode}.log"), start_timeout=600)
    srv.env = dict(MODE_ENV.get(mode, {}))
    if freekv and a.query_cosine is not None:
        srv.env.update({"FREEKV_BENCH_QUERY_COSINE": str(a.query_cosine), "FREEKV_LOG_STATS_EVERY": "0"})
    if freekv and getattr(a, "locality", None) is not None:
        srv.env.update({"FREEKV_BENCH_LOCALITY": a.locality, "FREEKV_LOG_STATS_EVERY": "0"})
    rng = random.Random(zlib.crc32(mode.encode()))
    rows = []
    t0 = time.time()
    try:
        with srv:
            srv.generate_many([[rng.randrange(100, 40000) for _ in range(256)]], 8, timeout=a.timeout)  # warm-up
            for c in a.contexts:
                warm_up(srv, rng, c, a.short, a.vocab, a.timeout)
                for b in a.batch_sizes:
                    try:
                        r = decode_ms_per_step(srv, rng, c, b, a.short, a.long, a.vocab, a.timeout, a.repeats)
                    except Exception as e:  # noqa: BLE001 - report the cell, keep the others
                        r = {"context": c, "batch": b, "error": f"{type(e).__name__}: {str(e)[:200]}"}
                    rows.append(r)
                    print(f"[overlap] {mode} ctx {c} bs {b}: {r}", flush=True)
    except Exception as e:  # noqa: BLE001 - a server that does not start: report it, go on
        rows.append({"error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(f"[overlap] {mode}: {rows[-1]['error']}", flush=True)
    print(f"[overlap] {mode}: {time.time() - t0:.0f}s", flush=True)
    return rows


def report(results: dict[str, list[dict]]) -> str:
    cell = {m: {(r["context"], r["batch"]): r.get("decode_ms_per_step") for r in rows if "context" in r}
            for m, rows in results.items()}
    keys = sorted({k for m in cell.values() for k in m})
    modes = list(results)
    lines = ["| context | batch | " + " | ".join(f"{m} ms/step" for m in modes)
             + " | overlap off / on (dense) | FreeKV speed-up vs dense | vs dense-no-overlap |"
             + (" FreeKV overlap off / on |" if "freekv-overlap" in modes else ""),
             "|---:|---:|" + "---:|" * (len(modes) + 3 + ("freekv-overlap" in modes))]

    def ratio(x, y):
        return f"{x / y:.2f}x" if x and y else "-"

    for k in keys:
        v = {m: cell[m].get(k) for m in modes}
        lines.append(f"| {k[0]} | {k[1]} | " + " | ".join(f"{v[m]:.2f}" if v[m] else "-" for m in modes)
                     + f" | {ratio(v.get('dense-no-overlap'), v.get('dense'))} | {ratio(v.get('dense'), v.get('freekv'))}"
                     f" | {ratio(v.get('dense-no-overlap'), v.get('freekv'))} |"
                     + (f" {ratio(v.get('freekv'), v.get('freekv-overlap'))} |" if "freekv-overlap" in modes else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=".gpu-bundle/models/llama-8b-shape")
    p.add_argument("--contexts", type=int, nargs="+", default=[32000])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--modes", nargs="+", default=["dense", "dense-no-overlap", "freekv"], choices=list(MODES),
                   help="freekv-overlap: FreeKV with the overlap scheduler left on (experimental opt-in)")
    p.add_argument("--short", type=int, default=16, help="new tokens of the short run")
    p.add_argument("--long", type=int, default=400, help="new tokens of the long run")
    p.add_argument("--repeats", type=int, default=1, help="(short, long) pairs per cell; the median is reported")
    p.add_argument("--vocab", type=int, default=49152, help="token ids are drawn below this")
    p.add_argument("--host-gb", type=float, default=48.0, help="FreeKV host tier (GiB)")
    loc = p.add_mutually_exclusive_group()
    loc.add_argument("--query-cosine", type=float, default=None,
                     help="FreeKV only: synthetic consecutive-query cosine (benchmark only, outputs meaningless)")
    loc.add_argument("--locality", default=None, metavar="calibrated[:PATH]", type=_locality,
                     help="FreeKV only: synthetic queries at a measured real locality (freekv_sglang/runtime/"
                          "synthetic.py; calibrated: docs/data/locality-smollm2-135m.json); outputs meaningless")
    p.add_argument("--port", type=int, default=30021)
    p.add_argument("--timeout", type=float, default=900.0, help="per request batch, seconds")
    p.add_argument("--out", default="overlap-out")
    a = p.parse_args(argv)
    if a.long <= a.short:
        p.error("--long must be larger than --short")
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    os.makedirs(a.out, exist_ok=True)
    results = {}
    for mode in a.modes:
        results[mode] = run_mode(mode, a)
        with open(os.path.join(a.out, "bench_overlap.json"), "w") as f:
            json.dump({"args": vars(a), "results": results}, f, indent=1)
    out = write_report(a.out, __file__, a.model, sys.argv[1:] if argv is None else list(argv), report(results))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
