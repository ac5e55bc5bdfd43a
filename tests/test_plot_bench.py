"""launch/plot_bench.py turns the benchmark JSON files into PNGs (CPU, matplotlib)."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(HERE), "launch", "plot_bench.py")


def _run(tmp_path, kind, data):
    pytest.importorskip("matplotlib")
    src = tmp_path / f"{kind}.json"
    src.write_text(json.dumps(data))
    out = tmp_path / f"{kind}.png"
    r = subprocess.run([sys.executable, SCRIPT, f"--{kind}", str(src), "--out", str(out)], capture_output=True,
                       text=True, timeout=120, cwd=HERE)
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decode_plot(tmp_path):
    rows = lambda ms: [{"input_len": c, "batch_size": b, "median_decode_latency": ms * b ** 0.5}  # noqa: E731
                       for c in (8000, 32000) for b in (1, 4, 8)]
    _run(tmp_path, "decode", {"card": "test", "args": {"model": "m"},
                              "results": {"dense": rows(0.007), "freekv": rows(0.006)}})


def test_profile_plot(tmp_path):
    rows = [{"variant": v, "bs": b, "similarity": s, "ms_per_layer": 0.05 + 0.01 * b * (1 - s)}
            for v in ("freekv", "skip") for b in (1, 8) for s in (0.0, 0.9, 0.99)]
    _run(tmp_path, "profile", {"device": "test", "args": {"context": 32000}, "rows": rows,
                               "dense": {"bs1_page32": 0.058, "bs8_page32": 0.375}})


def test_empty_input_is_an_error(tmp_path):
    pytest.importorskip("matplotlib")
    src = tmp_path / "empty.json"
    src.write_text(json.dumps({"results": {}}))
    r = subprocess.run([sys.executable, SCRIPT, "--decode", str(src), "--out", str(tmp_path / "x.png")],
                       capture_output=True, text=True, timeout=120, cwd=HERE)
    assert r.returncode != 0 and "no decode results" in r.stderr
