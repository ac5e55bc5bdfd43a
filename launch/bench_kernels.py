#!/usr/bin/env python
"""Benchmark of the FreeKV data-path kernels on one GPU (a few minutes).

Sections (each guarded: an error is printed and recorded, the rest still runs; the JSON
file is rewritten after every section), one module each under ``launch/kernel_bench/``:

* ``info``        the device and the software versions;
* ``ceilings``    bulk pinned H2D / D2H copies (256 MiB) and an HBM device copy (1 GiB);
* ``recall``      ``recall_selected`` (the runtime's path, CUDA graph) and
                  ``recall_gather`` / ``recall_staged`` / ``recall_per_page`` GB/s on
                  Llama-3.1-8B-shaped work (Hkv=8, D=128, P=32, 32 pages per head), batch
                  1/8/32, all pages missing and ~15% missing, vs the H2D ceiling; a sweep of
                  the gather's persistent grid size;
* ``overlap``     SMs held by the gather (grid vs SM count) and the slowdown of a concurrent
                  8192^3 bf16 matmul on another stream;
* ``interfere``   the runtime's recall (``recall_selected``) by grid size and warps per program,
                  beside a decode-like memory-bound victim on another stream (16 x 4096 @ 4096 x
                  28672 bf16 matmuls: weight streaming, as a decode step at batch 16 does): the
                  victim's slowdown and the recall's GB/s, to choose the recall's shape;
* ``offload``     ``store_kv_host`` for a 32K-token prefill layer vs the D2H ceiling, and a
                  decode-sized store;
* ``scores``      ``score_and_select`` (the runtime's fused scoring + top-k + residency) and the
                  unfused ``score_pages`` + ``select_and_diff`` at 32K / 128K contexts, batch 1/8,
                  vs reading the digests at the measured HBM speed;
* ``grid``        2-bit grid-code scoring (``score_pages_grid``, the ``grid2`` rule) vs Quest's ``score_pages``
                  at 32K x batch 8 (times, ratio, a launch-shape sweep) and writing its codes vs the digests;
* ``decode``      ``SparseDecode`` over a 2048-token working set vs FlashInfer dense paged
                  decode over 32K tokens (page size 1 and 32), batch 1/8/32, 32 q / 8 kv heads;
* ``step``        the same attention (FlashInfer and the Triton split decode) and the fused selection
                  per layer as a captured decode step runs them: 8 layers over their own buffers in
                  one CUDA graph, replay time / 8; the selection's launch order and program shape;
* ``hostalloc``   page-locking a 32 GiB host tier with each allocator (``FREEKV_BENCH_HOSTALLOC_GIB``).

Timings: ``triton.testing.do_bench`` medians (it flushes L2 before every call); "graph"
figures replay the op captured in a CUDA graph (GPU time without Python launch cost);
host-synchronising recalls are timed wall-clock around a device sync.

Usage: ``python launch/bench_kernels.py --json bench_kernels.json [--sections a,b] [--quick]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests, other launch/ scripts)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
# the sections; graph_ms and pinned_copy_gbps are also used by profile_decode_step.py and bench_decode.py
from freekv_sglang.provenance import record  # noqa: E402
from kernel_bench.decode import sec_decode  # noqa: E402
from kernel_bench.grid_scores import sec_grid_scores  # noqa: E402
from kernel_bench.hostalloc import sec_hostalloc  # noqa: E402
from kernel_bench.info import pinned_copy_gbps, sec_ceilings, sec_info  # noqa: E402
from kernel_bench.interfere import sec_interfere  # noqa: E402
from kernel_bench.offload import sec_offload  # noqa: E402
from kernel_bench.overlap import sec_overlap  # noqa: E402
from kernel_bench.recall import sec_recall  # noqa: E402
from kernel_bench.scores import sec_scores  # noqa: E402
from kernel_bench.step import sec_step  # noqa: E402
from kernel_bench.timing import Runner, graph_ms  # noqa: E402

__all__ = ["SECTIONS", "main", "graph_ms", "pinned_copy_gbps"]

SECTIONS = ("info", "ceilings", "recall", "overlap", "interfere", "offload", "scores", "grid", "decode", "step",
            "hostalloc")
#: each section's function and whether it takes ``--quick``
SECTION_FNS = {"info": (sec_info, False), "ceilings": (sec_ceilings, False), "recall": (sec_recall, True),
               "overlap": (sec_overlap, False), "interfere": (sec_interfere, False), "offload": (sec_offload, False),
               "scores": (sec_scores, True), "grid": (sec_grid_scores, True), "decode": (sec_decode, True),
               "step": (sec_step, True), "hostalloc": (sec_hostalloc, True)}
NEED_CEILINGS = ("recall", "offload", "scores", "grid", "step")  # their ratios need the ceilings


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, help="write results here (rewritten after every section)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    ap.add_argument("--commit", help="commit to record (default: the checkout's HEAD)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    return ap.parse_args(argv)


def wanted_sections(spec: str) -> list[str]:
    """The sections of a ``--sections`` list in run order, ``ceilings`` added where a ratio needs it; exits
    on an unknown name."""
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    for s in wanted:
        if s not in SECTIONS:
            sys.exit(f"unknown section {s!r}; choose from {SECTIONS}")
    if "ceilings" not in wanted and any(s in wanted for s in NEED_CEILINGS):
        wanted.insert(0, "ceilings")
    return [s for s in SECTIONS if s in wanted]


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA device")
    sections = wanted_sections(args.sections)
    t0 = time.time()
    r = Runner(args.json)
    r.results["provenance"] = record("launch/bench_kernels.py", sys.argv[1:] if argv is None else list(argv),
                                     args.commit)
    for s in sections:
        fn, takes_quick = SECTION_FNS[s]
        r.section(s, fn, *((args.quick,) if takes_quick else ()))
    r.results["total_seconds"] = round(time.time() - t0, 1)
    r.save()
    r.table()
    print(f"total {r.results['total_seconds']} s" + (f"; JSON: {args.json}" if args.json else ""))


if __name__ == "__main__":
    main()
