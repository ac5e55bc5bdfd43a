"""Run the end-to-end server tests spread over several GPUs of one host, one pytest process per GPU.

The server tests start one SGLang server after another (about a minute each; the suite is about 25
minutes on one GPU). This script collects their test ids, deals them round-robin to one lane per
GPU (``CUDA_VISIBLE_DEVICES``), gives every lane its own server port (``FREEKV_TEST_PORT``) and log
folder (``OUT``), writes the shared KV-sensitive test model once before the lanes start (so that
they do not race to write it), and waits for all of them. The tests write their dummy-weight model
folders themselves (``freekv_sglang.testing.shape_models``).

Usage (repo root, this project and SGLang installed)::

    python launch/e2e_lanes.py --gpus 0,1,2 --out e2e-out [-k EXPR] [--timeout S] [TESTS ...]

Prints one line per lane (its tests, exit status, pytest's summary) and exits non-zero when a lane
failed or timed out, when every test of a lane was skipped (pytest exits 0 then, but nothing was
checked: no CUDA device, a missing dependency, a skip condition that should not hold), or (5, as
pytest) when nothing was collected. ``launch/gpu_check.sh`` runs the server tests through it (one
lane, or one per GPU of ``E2E_GPUS``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_TESTS = ("tests/gpu/test_server_e2e.py", "tests/gpu/test_server_traffic.py", "tests/gpu/test_server_prefix.py",
                 "tests/gpu/test_server_overlap.py")
BASE_PORT = 30111


def collect(tests: list[str], k: str | None, python: str = sys.executable) -> list[str]:
    """Test ids pytest collects from ``tests`` (with ``-k``), in collection order."""
    cmd = [python, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *tests]
    if k:
        cmd += ["-k", k]
    r = subprocess.run(cmd, capture_output=True, text=True)
    ids = [line.strip() for line in r.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    if r.returncode not in (0, 5) or (r.returncode == 0 and not ids):  # 5: nothing collected
        raise RuntimeError(f"collecting {tests} failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return ids


def deal(ids: list[str], lanes: int) -> list[list[str]]:
    """Round-robin: lane ``i`` gets tests ``i, i + lanes, ...`` (neighbouring tests often share a
    fixture's server, so consecutive tests land on different lanes only when there are many)."""
    if lanes < 1:
        raise ValueError("need at least one lane")
    return [ids[i::lanes] for i in range(lanes)]


def prepare_sensitive_model(out: Path, model: str | None, python: str = sys.executable) -> str:
    """Write the KV-sensitive random Llama once (``FREEKV_SENSITIVE_MODEL``, default under ``out``), with the
    tokenizer of the folder ``model``, or without one the test tokenizer of
    :func:`freekv_sglang.testing.shape_models.write_tokenizer`."""
    path = os.environ.get("FREEKV_SENSITIVE_MODEL") or str(out / "random-llama")
    code = ("import sys; from freekv_sglang.testing.random_llama import write_random_llama; "
            "from freekv_sglang.testing.shape_models import write_tokenizer; "
            "p = write_random_llama(sys.argv[1], tokenizer_from=sys.argv[2] or None); "
            "sys.argv[2] or (p / 'tokenizer.json').exists() or write_tokenizer(p)")
    subprocess.run([python, "-c", code, path, model or ""], check=True)
    return path


_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)\b")


def outcome_counts(summary: str) -> dict[str, int]:
    """Counts of pytest's final summary line (``"3 passed, 2 skipped in 1.2s"``): passed, failed, skipped,
    error, xfailed, xpassed (absent ones 0)."""
    counts = dict.fromkeys(("passed", "failed", "skipped", "error", "xfailed", "xpassed"), 0)
    for n, what in _COUNTS.findall(summary):
        counts["error" if what.startswith("error") else what] += int(n)
    return counts


def only_skipped(summary: str) -> bool:
    """The summary reports skipped tests and no other outcome: nothing was checked."""
    c = outcome_counts(summary)
    return c["skipped"] > 0 and not any(v for k, v in c.items() if k != "skipped")


def lane_env(gpu: str, index: int, out: Path, base_port: int, extra: dict[str, str] | None = None) -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu, FREEKV_TEST_PORT=str(base_port + 10 * index),
               OUT=str(out / f"lane{index}"))
    env.update(extra or {})
    return env


def run_lanes(groups: list[list[str]], gpus: list[str], out: Path, *, timeout: float, base_port: int = BASE_PORT,
              extra_env: dict[str, str] | None = None, python: str = sys.executable) -> list[dict]:
    """One pytest process per non-empty group, all at once; returns per-lane results."""
    procs = []
    t0 = time.time()
    for i, (gpu, ids) in enumerate(zip(gpus, groups)):
        if not ids:
            continue
        env = lane_env(gpu, i, out, base_port, extra_env)
        Path(env["OUT"]).mkdir(parents=True, exist_ok=True)
        log = open(out / f"lane{i}.log", "w")
        cmd = [python, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "--tb=short", "-rA", *ids]
        procs.append((i, gpu, ids, log, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)))
    results = []
    for i, gpu, ids, log, p in procs:
        try:
            rc = p.wait(timeout=max(1.0, timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rc = 124
        log.close()
        # servers are separate processes: stop any a killed or failed lane left on its port
        subprocess.run(["pkill", "-9", "-f", f"--port {base_port + 10 * i}"], capture_output=True)
        lines = [ln for ln in (out / f"lane{i}.log").read_text().splitlines() if ln.strip()]
        results.append(dict(lane=i, gpu=gpu, tests=ids, rc=rc, summary=lines[-1] if lines else "(no output)"))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tests", nargs="*", default=list(DEFAULT_TESTS), help="test files or ids (default: the server tests)")
    ap.add_argument("--gpus", required=True, help="comma-separated GPU ids, one lane each (e.g. 0,1,2)")
    ap.add_argument("--out", default="e2e-out", help="logs: laneN.log and laneN/ (server logs) per lane")
    ap.add_argument("-k", dest="k", default=None, help="pytest -k expression")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds for all lanes together")
    ap.add_argument("--base-port", type=int, default=BASE_PORT, help="lane i serves on base + 10 i")
    ap.add_argument("--model", default=os.environ.get("FREEKV_TEST_MODEL"),
                    help="tokenizer source of the KV-sensitive test model (default: FREEKV_TEST_MODEL, else the "
                         "test tokenizer of freekv_sglang.testing.shape_models)")
    ap.add_argument("--no-prepare", action="store_true", help="do not write the KV-sensitive test model first")
    args = ap.parse_args(argv)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    if not gpus:
        ap.error("--gpus lists no GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ids = collect(args.tests, args.k)
    if not ids:  # as pytest: an empty selection (a mistyped -k, say) is not a pass
        print(f"[e2e_lanes] no tests collected from {args.tests}" + (f" with -k {args.k!r}" if args.k else ""))
        return 5
    extra = {}
    if not args.no_prepare:
        extra["FREEKV_SENSITIVE_MODEL"] = prepare_sensitive_model(out, args.model)
    groups = deal(ids, len(gpus))
    print(f"[e2e_lanes] {len(ids)} tests over {len(gpus)} GPUs ({', '.join(str(len(g)) for g in groups)} per lane)",
          flush=True)
    t0 = time.time()
    results = run_lanes(groups, gpus, out, timeout=args.timeout, base_port=args.base_port, extra_env=extra)
    skipped = []
    for r in results:
        status = "timed out" if r["rc"] == 124 else f"rc={r['rc']}"
        print(f"[e2e_lanes] lane {r['lane']} (GPU {r['gpu']}, {len(r['tests'])} tests): {status}; {r['summary']}")
        if r["rc"] == 0 and only_skipped(r["summary"]):
            skipped.append(r["lane"])
    for lane in skipped:
        print(f"[e2e_lanes] lane {lane}: every test was skipped, nothing was checked (reasons in "
              f"{out / f'lane{lane}.log'}): a failure")
    print(f"[e2e_lanes] {time.time() - t0:.0f} s")
    return 0 if all(r["rc"] == 0 for r in results) and not skipped else 1


if __name__ == "__main__":
    sys.exit(main())
