"""Serving traffic on a GPU: SGLang's own load generator against ``--kv-retrieval freekv``.

``python -m sglang.benchmark.serving`` (SGLang's ``bench_serving``) sends Poisson-timed requests of
random token ids whose prompt lengths spread from a few hundred tokens (shorter than a working set:
attended exactly) to 24K, with output lengths that vary too, more at once than the server runs (so
requests queue). Every request must complete, the server must stay up, and SGLang's strict idle check (every token slot
returned) must stay silent. The figures it prints (throughput, TTFT, TPOT) are for the record, not
a benchmark. Model: the Llama-3.1-8B shape with dummy weights, written by the test
(:mod:`freekv_sglang.testing.shape_models`; ``FREEKV_TEST_MODEL`` names another folder, which must exist).
Logs go to ``$OUT`` (or a temp dir).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from freekv_sglang.serving import Server
from freekv_sglang.testing.shape_models import model_folder

LOGDIR = os.environ.get("OUT") or tempfile.mkdtemp(prefix="freekv-traffic-")
HOST_GB = os.environ.get("FREEKV_TEST_HOST_GB", "40")
PORT = int(os.environ.get("FREEKV_TEST_PORT", "30013"))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """The Llama-3.1-8B-shaped folder (config and tokenizer, no weights)."""
    return model_folder("llama-8b-shape", "FREEKV_TEST_MODEL", tmp_path_factory.mktemp("shape-models"))


# SGLang's benchmark package imports HuggingFace ``datasets`` at module level (for its MMMU loader)
# although the random-ids dataset never calls it. Where ``datasets`` is not installed, a stand-in
# module whose ``load_dataset`` raises lets ``sglang.benchmark.serving`` start.
_RUN_BENCH_SERVING = """
import importlib.util, runpy, sys, types
if importlib.util.find_spec("datasets") is None:
    def load_dataset(*args, **kwargs):
        raise ModuleNotFoundError("HuggingFace 'datasets' is not installed (pip install datasets)")
    sys.modules["datasets"] = types.ModuleType("datasets")
    sys.modules["datasets"].load_dataset = load_dataset
runpy.run_module("sglang.benchmark.serving", run_name="__main__", alter_sys=True)
"""


def bench_serving(base: str, model: str, out_file: str, *, num_prompts: int, input_len: int, output_len: int,
                  ratio: float, rate: float, log_path: str) -> dict:
    """One ``sglang.benchmark.serving`` run; returns its JSON result line."""
    cmd = [sys.executable, "-c", _RUN_BENCH_SERVING, "--backend", "sglang", "--base-url", base,
           "--model", model, "--tokenizer", model, "--dataset-name", "random-ids",
           "--random-input-len", str(input_len), "--random-output-len", str(output_len),
           "--random-range-ratio", str(ratio), "--num-prompts", str(num_prompts), "--request-rate", str(rate),
           "--seed", "1", "--output-file", out_file, "--disable-tqdm",
           "--tokenize-prompt"]  # send the random ids as ids: a text round trip would change the prompt lengths
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=1500).returncode
    assert rc == 0, f"bench_serving exited with {rc} (see {log_path})"
    with open(out_file) as f:
        return json.loads(f.read().strip().splitlines()[-1])


def test_mixed_length_traffic_completes(model):
    args = ["--model-path", model, "--load-format", "dummy", "--kv-retrieval", "freekv", "--freekv-host-memory-gb",
            HOST_GB, "--max-running-requests", "16", "--cuda-graph-max-bs", "16"]
    srv = Server(args, port=PORT, log_path=os.path.join(LOGDIR, "server-traffic.log"),
                 start_timeout=float(os.environ.get("FREEKV_TEST_SERVER_TIMEOUT", "600")),
                 env={"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"})
    n = int(os.environ.get("FREEKV_TRAFFIC_PROMPTS", "48"))
    with srv as s:
        res = bench_serving(s.base, model, os.path.join(LOGDIR, "traffic.jsonl"), num_prompts=n, input_len=24000,
                            output_len=128, ratio=0.02, rate=4.0, log_path=os.path.join(LOGDIR, "traffic.log"))
        print(f"{res['completed']}/{n} requests, {res['total_input_tokens']} prompt and {res['total_output_tokens']} "
              f"output tokens in {res['duration']:.1f}s: {res['request_throughput']:.2f} req/s, "
              f"{res['output_throughput']:.0f} output tok/s, median TTFT {res['median_ttft_ms']:.0f} ms, "
              f"median TPOT {res['median_tpot_ms']:.1f} ms")
        assert res["completed"] == n
        assert s.proc.poll() is None, "server died (see its log)"
        log = open(s.log_path, errors="replace").read()
        assert "memory leak detected" not in log and "Traceback" not in log
