"""End to end on a GPU: stock ``python -m sglang.launch_server`` with ``--kv-retrieval freekv``.

Models: a Llama-3.1-8B-shaped config with dummy weights (``FREEKV_TEST_MODEL``, default
``.gpu-bundle/models/llama-8b-shape``) for serving, memory and API checks; and, for every test that
compares the outputs of two servers, a small random Llama whose greedy tokens depend on its KV
cache (:mod:`freekv_sglang.testing.random_llama`, written once per machine; head dim 128, GQA group 4).
SGLang's dummy weights make the next token a function of the current token alone, so two servers
agree on their tokens whatever their attention computes. Runs are compared up to rounding
(:func:`freekv_sglang.testing.greedy_compare.compare_runs`), and a negative control shows that
the comparison catches a server that attends to the wrong pages. Server logs go to ``$OUT`` (or a
temp dir).
"""

from __future__ import annotations

import os
import random
import tempfile
import time

import pytest

from freekv_sglang.serving import Server, output_ids
from freekv_sglang.testing.greedy_compare import GreedyTrace, compare_runs
from freekv_sglang.testing.random_llama import write_random_llama

MODEL = os.environ.get("FREEKV_TEST_MODEL", ".gpu-bundle/models/llama-8b-shape")
QWEN = os.environ.get("FREEKV_TEST_MODEL_QWEN", ".gpu-bundle/models/qwen2.5-7b-shape")
LOGDIR = os.environ.get("OUT") or tempfile.mkdtemp(prefix="freekv-e2e-")
HOST_GB = os.environ.get("FREEKV_TEST_HOST_GB", "40")
VOCAB = 49152

pytestmark = pytest.mark.skipif(not os.path.isdir(MODEL), reason=f"test model folder {MODEL} not found")


def prompts(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(100, VOCAB - 100) for _ in range(n)] for n in lengths]


PORT = int(os.environ.get("FREEKV_TEST_PORT", "30011"))


def server(name, *extra, port=PORT, model=MODEL):
    # the shape-only model folders (no weight files: dummy weights) share the llama folder's tokenizer
    weights = os.path.exists(os.path.join(model, "model.safetensors"))
    args = ["--model-path", model, "--tokenizer-path", MODEL, *([] if weights else ["--load-format", "dummy"]),
            "--trust-remote-code", *extra]
    return Server(args, port=port, log_path=os.path.join(LOGDIR, f"server-{name}.log"),
                  start_timeout=float(os.environ.get("FREEKV_TEST_SERVER_TIMEOUT", "600")))


@pytest.fixture(scope="session")
def sensitive_model():
    """Folder of the KV-sensitive random Llama (``FREEKV_SENSITIVE_MODEL`` or a fixed temp path; reused)."""
    path = os.environ.get("FREEKV_SENSITIVE_MODEL") or os.path.join(tempfile.gettempdir(), "freekv-random-llama")
    return str(write_random_llama(path, tokenizer_from=MODEL))


def traces(srv, ps, news) -> list[GreedyTrace]:
    """Greedy generations of ``ps`` with each step's two most likely tokens."""
    return [GreedyTrace.from_response(r) for r in srv.generate_many(ps, news, top_logprobs=2)]


def assert_agree(name: str, got: list[GreedyTrace], want: list[GreedyTrace]):
    """The runs agree up to rounding (:func:`compare_runs`; prints the pooled mean and one line per prompt)."""
    runs = compare_runs(got, want)
    print(f"{name}: {runs}")
    assert runs.ok, f"{name}: runs disagree beyond rounding ({runs.reason})"
    return runs.results


def freekv_args(*extra):
    # a small graph batch range keeps each server's start short (tests run at most 16 requests)
    return ["--kv-retrieval", "freekv", "--freekv-host-memory-gb", HOST_GB, "--cuda-graph-max-bs", "16", *extra]


def dense_args(*extra):
    return ["--attention-backend", "flashinfer", "--disable-cuda-graph", "--disable-radix-cache",
            "--disable-overlap-schedule", "--page-size", "32", *extra]


def frontend_and_chat(srv) -> tuple[str, str]:
    """Text of an SGLang frontend program and of an OpenAI chat completion (greedy) on server ``srv``."""
    import sglang as sgl

    @sgl.function
    def qa(s, question):  # SGLang requires the state argument to be named "s"
        s += "Question: " + question + "\n"
        s += "Answer:" + sgl.gen("answer", max_tokens=24, temperature=0)

    state = qa.run(question="Which layout does the host tier use?", backend=sgl.RuntimeEndpoint(srv.base))
    chat = srv.chat([{"role": "user", "content": "Say something about KV caches."}], 24)
    return state["answer"], chat["choices"][0]["message"]["content"]


def test_budget_covers_context_matches_dense(sensitive_model):
    """Budget >= context: FreeKV over the whole context agrees with dense SGLang (FlashInfer) up to
    rounding, on the KV-sensitive model, for a batch of prompts of different lengths."""
    ps = prompts([300, 1000, 2500, 77, 3900], seed=1)
    new = 32
    with server("dense-small", *dense_args(), model=sensitive_model) as s:
        want = traces(s, ps, new)
    with server("freekv-covering", *freekv_args("--freekv-select-tokens", "8192"), model=sensitive_model) as s:
        got = traces(s, ps, new)
    assert all(len(g.tokens) == new for g in got)
    assert_agree("FreeKV covering the context vs dense", got, want)


@pytest.mark.parametrize("model", [MODEL, QWEN], ids=["llama8b-shape", "qwen7b-shape"])
def test_dummy_shapes_serve_frontend_and_chat(model):
    """The real model shapes (dummy weights: outputs carry no signal, see the module docstring) serve a
    batch with FreeKV over sparse contexts; with the Llama shape also an SGLang frontend program and
    /v1/chat/completions, whose texts are those of dense SGLang (an API check, not an accuracy one)."""
    if not os.path.isdir(model):
        pytest.skip(f"{model} not found")
    ps = prompts([300, 3000, 5200, 77], seed=1)
    with server("freekv-shape", *freekv_args(), model=model) as s:
        got = [output_ids(r) for r in s.generate_many(ps, 16)]
        got_text = frontend_and_chat(s) if model == MODEL else None
    assert [len(g) for g in got] == [16] * len(ps)
    if model == MODEL:
        with server("dense-shape", *dense_args(), model=model) as s:
            want_text = frontend_and_chat(s)
        print("frontend program / chat completion texts:", got_text)
        assert all(got_text) and got_text == want_text


def test_default_flags_just_work():
    """Only ``--kv-retrieval freekv``: host tier, running requests, page size and CUDA graphs from the
    defaults; a long and a short prompt served together (48 tokens each: SGLang logs a decode batch, with
    its "cuda graph" flag, every 40 decode steps)."""
    import re

    ps = prompts([20000, 500], seed=6)
    with server("freekv-defaults", "--kv-retrieval", "freekv") as s:
        res = s.generate_many(ps, 48, timeout=900)
        log = open(s.log_path).read()
    assert [len(output_ids(r)) for r in res] == [48, 48]
    m = re.search(r"FreeKV memory: .*", log)
    print("defaults:", m.group(0) if m else "(no FreeKV memory line)")
    assert m is not None and "cuda graph: True" in log


def test_cuda_graph_matches_eager(sensitive_model):
    """Sparse decoding (contexts beyond the working set) with decode CUDA graphs agrees with eager
    decoding; batch sizes change between steps (requests stop at different lengths) and are padded to
    graph sizes (5 running, then 4, 2, ...; a second batch of 3)."""
    ps = prompts([3000, 4100, 5200, 2600, 6000], seed=4)
    news = [48, 20, 35, 48, 9]
    with server("freekv-eager", *freekv_args("--disable-cuda-graph"), model=sensitive_model) as s:
        want = traces(s, ps, news)
        want3 = traces(s, ps[:3], 24)
    with server("freekv-graph", *freekv_args(), model=sensitive_model) as s:
        got = traces(s, ps, news)
        got3 = traces(s, ps[:3], 24)
        log = open(s.log_path).read()
    assert "cuda graph: True" in log
    res = assert_agree("graph vs eager", got + got3, want + want3)
    print("identical token sequences:", sum(r.prefix == r.length for r in res), "of", len(res))


VARIANT_PROMPTS = dict(lengths=[3000, 4100, 5200, 2600, 6000], news=[40, 16, 33, 40, 7], seed=6)


def variant_prompts():
    return prompts(VARIANT_PROMPTS["lengths"], seed=VARIANT_PROMPTS["seed"])


@pytest.fixture(scope="module")
def default_traces(sensitive_model):
    """A default FreeKV server (sparse contexts, decode CUDA graphs) on VARIANT_PROMPTS; its log."""
    with server("freekv-default-v", *freekv_args(), model=sensitive_model) as s:
        got = traces(s, variant_prompts(), VARIANT_PROMPTS["news"])
        log = open(s.log_path).read()
    return got, log


def test_overlap_scheduler_opt_in_matches_default(sensitive_model, default_traces):
    """Experimental: with FREEKV_EXPERIMENTAL_OVERLAP_SCHEDULE=1 the overlap scheduler stays on; sparse
    decoding agrees with the default (overlap scheduler turned off by the plugin)."""
    want, default_log = default_traces
    assert "overlap scheduler" in default_log  # the plugin's note that it turns it off
    srv = server("freekv-overlap", *freekv_args(), model=sensitive_model)
    srv.env = {"FREEKV_EXPERIMENTAL_OVERLAP_SCHEDULE": "1"}
    with srv as s:
        got = traces(s, variant_prompts(), VARIANT_PROMPTS["news"])
        log = open(s.log_path).read()
    assert "overlap scheduler stays as configured" in log
    assert_agree("overlap vs default", got, want)


@pytest.mark.parametrize("name,env", [("deferred", {"FREEKV_DEFER_LAYERS": "2"}),
                                      ("async-prefill", {"FREEKV_ASYNC_PREFILL": "1"})])
def test_runtime_variant_matches_default(name, env, sensitive_model, default_traces):
    """Variants that reorder work without changing what is computed agree with the default:
    FREEKV_DEFER_LAYERS (the last layers speculate at the next step's start, inside the decode graphs)
    and FREEKV_ASYNC_PREFILL (prefill layers offloaded on a side stream)."""
    srv = server(f"freekv-{name}", *freekv_args(), model=sensitive_model)
    srv.env = dict(env)
    with srv as s:
        got = traces(s, variant_prompts(), VARIANT_PROMPTS["news"])
        log = open(s.log_path).read()
    assert "cuda graph: True" in log
    assert_agree(f"{name} vs default", got, default_traces[0])


def test_runtime_variant_gpu_tier_matches_default(sensitive_model, default_traces):
    """A host tier too small for the batch and a GPU tier for the rest (--freekv-gpu-tier-gb): the later
    requests' KV lives in GPU memory, and the runs agree with the default server's."""
    # this model keeps 8 KiB of KV per token: 0.09375 GiB = 12288 tokens on the host; the prompts take ~21K
    with server("freekv-gpu-tier", *freekv_args("--freekv-host-memory-gb", "0.09375", "--freekv-gpu-tier-gb", "1"),
                model=sensitive_model) as s:
        got = traces(s, variant_prompts(), VARIANT_PROMPTS["news"])
        log = open(s.log_path).read()
    assert "GPU tier" in log and "cuda graph: True" in log
    assert_agree("gpu-tier vs default", got, default_traces[0])


def test_runtime_variant_fp8_tiers_serve(sensitive_model, default_traces):
    """--freekv-kv-storage fp8_e4m3: the server starts, reports FP8 tiers, and completes every request with
    the requested tokens. FP8 rounding of K/V moves the outputs beyond bf16 rounding, so the comparison
    with the default is printed, not asserted (accuracy: docs/FIDELITY.md; arithmetic: the GPU runtime
    tests)."""
    with server("freekv-fp8", *freekv_args("--freekv-kv-storage", "fp8_e4m3"), model=sensitive_model) as s:
        got = traces(s, variant_prompts(), VARIANT_PROMPTS["news"])
        log = open(s.log_path).read()
    assert "kv_storage=fp8_e4m3" in log and "cuda graph: True" in log
    assert [len(t.tokens) for t in got] == VARIANT_PROMPTS["news"]
    print(f"fp8 tiers vs default: {compare_runs(got, default_traces[0])}")


def test_comparison_catches_wrong_pages(sensitive_model, default_traces):
    """Negative control: with transfers skipped (--freekv-recall skip: selected pages are never brought to
    the GPU, so attention reads whatever the slots held) the runs disagree with the default
    (:func:`compare_runs`). If this fails, the comparisons above cannot see attention errors."""
    with server("freekv-skip", *freekv_args("--freekv-recall", "skip"), model=sensitive_model) as s:
        got = traces(s, variant_prompts(), VARIANT_PROMPTS["news"])
    runs = compare_runs(got, default_traces[0])
    print(f"skip (wrong pages) vs default: {runs}")
    assert not runs.ok


def _gpu_used_mib(pid: int) -> int | None:
    """GPU memory (MiB) nvidia-smi reports for the process tree of ``pid`` (None if unavailable)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
        kids = subprocess.run(["pgrep", "-g", str(os.getpgid(pid))], capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    pids = {int(x) for x in kids} | {pid}
    used = [int(m) for p_, m in (line.split(",") for line in out.strip().splitlines() if "," in line)
            if int(p_) in pids]
    return sum(used) if used else None


def test_long_concurrent_generate_and_completions_with_abort():
    """8 concurrent 32K-token prompts x 256 tokens (4 via /generate, 4 via /v1/completions); then 8
    long generations of which 4 are aborted midway; the pool must balance (SGLang's idle check) and
    all 8 prompts must fit again."""
    import json
    import re
    import threading
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    ps = prompts([32000] * 8, seed=2)
    new = 256
    srv = server("freekv-32k", *freekv_args("--max-running-requests", "16"))
    srv.env = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}  # a leak stops the scheduler
    with srv as s:
        t0 = time.time()
        with ThreadPoolExecutor(max_workers=8) as ex:
            gens = [ex.submit(s.generate, p, new, 1200) for p in ps[:4]]
            comps = [ex.submit(s.completion, p, new, 1200) for p in ps[4:]]
            gens, comps = [f.result() for f in gens], [f.result() for f in comps]
        assert all(len(output_ids(r)) == new for r in gens)
        assert all(c["usage"]["completion_tokens"] == new and c["choices"][0]["text"] is not None for c in comps)
        print(f"8 x 32K x {new} (4 /generate + 4 /v1/completions) concurrently in {time.time() - t0:.1f}s")
        log = open(s.log_path).read()
        m = re.search(r"FreeKV memory: .*", log)
        print("formula:", m.group(0) if m else "(no FreeKV memory line)")
        print("GPU memory of the server processes (nvidia-smi):", _gpu_used_mib(s.proc.pid), "MiB")
        assert m is not None

        # 8 long generations; abort 4 of them by request id midway
        results = {}

        def run(i):
            try:
                results[i] = s.generate(ps[i], 1024, timeout=1200, rid=f"long-{i}")
            except Exception as e:  # noqa: BLE001 - aborted requests may end with an error body
                results[i] = {"error": repr(e)}

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(15)
        for i in range(0, 8, 2):
            req = urllib.request.Request(s.base + "/abort_request", data=json.dumps({"rid": f"long-{i}"}).encode(),
                                         headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=30).read()
        for t in threads:
            t.join(timeout=600)
        assert len(results) == 8
        for i in range(1, 8, 2):
            assert len(output_ids(results[i])) == 1024, f"request {i} was not aborted but did not finish"
        for i in range(0, 8, 2):
            r = results[i]
            reason = (r.get("meta_info", {}).get("finish_reason") or {}) if "error" not in r else {"type": "abort"}
            assert reason.get("type") == "abort", f"request {i}: {reason}"
        time.sleep(5)  # idle: SGLang checks that every token slot came back
        assert s.proc.poll() is None, "server died (see log)"
        log = open(s.log_path).read()
        assert "memory leak detected" not in log
        t1 = time.time()
        again = s.generate_many(ps, 8, timeout=1200)
        assert all(len(output_ids(r)) == 8 for r in again)
        print(f"after aborts: 8 x 32K prompts served in {time.time() - t1:.1f}s")


def test_prompt_longer_than_dense_pool():
    """A 120K-token prompt that the dense pool at a small static fraction cannot hold is served by FreeKV."""
    import torch

    p = prompts([120000], seed=3)
    # room for the ~15 GB of weights plus ~8 GB: far less KV than 120K tokens (16 GB) for dense
    total_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
    frac = f"{min(0.9, 23.0 / total_gb):.3f}"
    with server("dense-120k", *dense_args("--mem-fraction-static", frac)) as s:
        info = s.server_info()
        dense_cap = info.get("max_total_num_tokens")
        print("dense capacity at mem fraction", frac, "=", dense_cap)
    if dense_cap is not None:
        assert dense_cap < 120000
    with server("freekv-120k", *freekv_args("--mem-fraction-static", frac)) as s:
        r = s.generate(p[0], 16, timeout=900)
        assert len(output_ids(r)) == 16
