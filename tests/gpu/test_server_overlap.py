"""FreeKV with SGLang's overlap scheduler on vs off, served end to end on a GPU.

The same requests go to a FreeKV server with the overlap scheduler off (the plugin's default) and to one with it
on (``FREEKV_EXPERIMENTAL_OVERLAP_SCHEDULE=1``, whose scheduler writes of ``req_to_token`` the runtime hooks fence
behind whole forwards: docs/DESIGN.md, "Under the overlap scheduler"). Both serve the KV-sensitive random Llama
(:mod:`freekv_sglang.testing.random_llama`: its greedy tokens depend on the K/V of the whole context), with
decode CUDA graphs, the radix cache and chunked prefill on, and few request rows, so that

- requests join and leave mid-decode: different prompt lengths (inside and far beyond the 2048-token working
  set) and output lengths, submitted at staggered times and in a burst larger than the running limit;
- a finished request's row and pages are handed to a newcomer while the overlap scheduler's extra decode step
  of the finished request may still be in flight;
- two requests with the same 2048-token prefix arrive together, so the radix cache re-points one's
  ``req_to_token`` at the other's pages while its first decode step runs.

Greedy tokens must agree and per-step log-probabilities stay within rounding
(:func:`freekv_sglang.testing.greedy_compare.compare_runs`: 0.3 nats a step, 0.05 on average, runs may split
only at near-ties). A state read after the next step's preparation changed it, an event not waited on or a
buffer reused too early moves them by far more (one wrong page in a 1000-token context moves the mean by about
0.08). Server logs go to ``$OUT`` (or a temp dir). About 3 minutes on an H100 (two servers of a 4-layer model,
decode graphs up to batch 8).

Run: ``pytest -q tests/gpu/test_server_overlap.py`` (``FREEKV_TEST_PORT`` to move the port,
``FREEKV_SENSITIVE_MODEL`` to reuse a written model folder).
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from freekv_sglang.serving import Server
from freekv_sglang.testing.greedy_compare import GreedyTrace, compare_runs
from freekv_sglang.testing.random_llama import write_random_llama
from freekv_sglang.testing.shape_models import write_tokenizer

LOGDIR = os.environ.get("OUT") or tempfile.mkdtemp(prefix="freekv-overlap-")
PORT = int(os.environ.get("FREEKV_TEST_PORT", "30011"))
VOCAB = 49152
OVERLAP_ENV = "FREEKV_EXPERIMENTAL_OVERLAP_SCHEDULE"
# few request rows (a newcomer takes a row another request just left), graphs for batches up to 8 only (a short
# start), a host tier far larger than the requests (8 KiB of K/V per token: 4 GiB hold 500K tokens)
ARGS = ["--kv-retrieval", "freekv", "--freekv-host-memory-gb", "4", "--max-running-requests", "6",
        "--cuda-graph-max-bs", "8", "--context-length", "16384"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = os.environ.get("FREEKV_SENSITIVE_MODEL") or os.path.join(tempfile.gettempdir(), "freekv-random-llama")
    return str(write_random_llama(path, tokenizer_from=write_tokenizer(tmp_path_factory.mktemp("tokenizer"))))


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, VOCAB - 100) for _ in range(n)]


SHARED = ids(2048, 100)
#: (prompt, max_new_tokens, submitted after seconds): short and long prompts, outputs of 5 to 96 tokens, two
#: requests with the same prefix at once, and later ones arriving while earlier ones still decode
STAGGERED = [
    (ids(3000, 1), 96, 0.0), (ids(700, 2), 12, 0.0), (ids(5200, 3), 40, 0.05),
    (SHARED + ids(300, 4), 48, 0.3), (SHARED + ids(900, 5), 24, 0.3),
    (ids(150, 6), 64, 0.6), (ids(6400, 7), 20, 0.8), (ids(2600, 8), 5, 0.8), (ids(4100, 9), 72, 1.2),
    (ids(1900, 10), 33, 1.5), (ids(7000, 11), 56, 1.9), (ids(90, 12), 9, 2.2), (ids(3500, 13), 80, 2.6),
    (ids(2300, 14), 17, 3.0),
]
#: a burst of ten, more than the six rows: the queue drains as requests finish at different steps
BURST = [(ids(n, 200 + i), new, 0.0) for i, (n, new) in enumerate(
    [(4000, 30), (800, 7), (2500, 64), (6000, 15), (300, 44), (5000, 25), (1200, 90), (3300, 11), (2048, 50),
     (4500, 36)])]


def run(srv: Server, requests) -> list[GreedyTrace]:
    """Submit each request at its time (one thread each) and return the greedy traces in request order."""
    t0 = time.monotonic()

    def one(req):
        prompt, new, at = req
        time.sleep(max(0.0, at - (time.monotonic() - t0)))
        return GreedyTrace.from_response(srv.generate(prompt, new, timeout=600, top_logprobs=2))

    with ThreadPoolExecutor(max_workers=len(requests)) as ex:
        traces = list(ex.map(one, requests))
    assert [len(t.tokens) for t in traces] == [new for _, new, _ in requests]
    return traces


def serve(model: str, name: str, overlap: bool):
    srv = Server(["--model-path", model, *ARGS], port=PORT, log_path=os.path.join(LOGDIR, f"server-{name}.log"),
                 start_timeout=float(os.environ.get("FREEKV_TEST_SERVER_TIMEOUT", "600")))
    srv.env = {OVERLAP_ENV: "1" if overlap else "0"}
    with srv as s:
        got = {"staggered": run(s, STAGGERED), "burst": run(s, BURST)}
        info = s.server_info()
        log = open(s.log_path).read()
    return got, info, log


def test_overlap_scheduler_matches_overlap_off_with_requests_joining_and_leaving(model):
    want, info_off, log_off = serve(model, "overlap-off", overlap=False)
    got, info_on, log_on = serve(model, "overlap-on", overlap=True)
    assert info_off.get("disable_overlap_schedule") is True
    assert info_on.get("disable_overlap_schedule") is False, "the opt-in did not keep the overlap scheduler on"
    for log in (log_off, log_on):
        assert "FreeKV runtime ready" in log and "cuda graph: True" in log
    assert "SGLANG_FORCE_COARSE_WAR_BARRIER=1" in log_on  # the runtime hooks' fence, in the scheduler process
    failures = []
    for key in ("staggered", "burst"):
        runs = compare_runs(got[key], want[key])
        print(f"overlap on vs off, {key}: {runs}")
        if not runs.ok:
            failures.append(f"{key}: {runs.reason}")
    assert not failures, f"overlap on vs off disagree beyond rounding: {failures}"
