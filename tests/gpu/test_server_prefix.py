"""Prefix reuse and chunked prefill through the host tier, served end to end on a GPU.

Every comparison serves the KV-sensitive random Llama (:mod:`freekv_sglang.testing.random_llama`, here with
65536 positions): its greedy tokens depend on the K/V of the whole context, so a prefix served wrongly from
the host tier (a wrong page, a stale digest, a missing layer) changes them. FreeKV with its defaults (radix
cache and chunked prefill on) must give the same tokens as FreeKV recomputing every prefix in one forward
(``--disable-radix-cache --chunked-prefill-size -1``), up to rounding ties
(:func:`freekv_sglang.testing.greedy_compare.compare_runs`), and as dense SGLang with its own radix cache.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from freekv_sglang.serving import Server, output_ids
from freekv_sglang.testing.greedy_compare import GreedyTrace, compare_runs
from freekv_sglang.testing.random_llama import RandomLlamaSpec, write_random_llama
from freekv_sglang.testing.shape_models import write_tokenizer

LOGDIR = os.environ.get("OUT") or tempfile.mkdtemp(prefix="freekv-prefix-")
PORT = int(os.environ.get("FREEKV_TEST_PORT", "30011"))
VOCAB = 49152
SPEC = RandomLlamaSpec(max_positions=65536)
COMMON = ["--cuda-graph-max-bs", "16", "--context-length", "65536"]
HOST_GB = "24"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tok = write_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    path = os.path.join(tempfile.gettempdir(), "freekv-random-llama-64k")
    return str(write_random_llama(path, SPEC, tokenizer_from=tok))


def _server(model, name, *extra, port=PORT):
    return Server(["--model-path", model, *COMMON, *extra], port=port,
                  log_path=os.path.join(LOGDIR, f"server-prefix-{name}.log"), start_timeout=600)


def freekv(model, name, *extra, port=PORT):
    return _server(model, name, "--kv-retrieval", "freekv", "--freekv-host-memory-gb", HOST_GB, *extra, port=port)


RECOMPUTE = ("--disable-radix-cache", "--chunked-prefill-size", "-1")


def ids(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(100, VOCAB - 100) for _ in range(n)]


def traces(srv, prompts, new):
    return [GreedyTrace.from_response(r) for r in srv.generate_many(prompts, new, top_logprobs=2)]


def agree(name, got, want):
    runs = compare_runs(got, want)
    print(f"{name}: {runs}")
    assert runs.ok, f"{name}: {runs.reason}"


def cached_tokens(resp) -> int:
    return int(resp.get("meta_info", {}).get("cached_tokens") or 0)


# ----------------------------------------------------------------------------------------------- the runs
def shared_prefix_and_chat(srv) -> dict:
    """Two requests sharing a 16K prefix (the second after the first, so it hits the radix cache), a
    4-turn chat appending to a 20K context, and a 40K prompt (chunked by the server's chunk size)."""
    out = {}
    prefix = ids(16384, 1)
    first = srv.generate(prefix + ids(300, 2), 32, top_logprobs=2)
    second = srv.generate(prefix + ids(500, 3), 32, top_logprobs=2)
    out["shared"] = [GreedyTrace.from_response(r) for r in (first, second)]
    out["shared_cached"] = cached_tokens(second)
    history, turns, cached = ids(20000, 4), [], []
    for t in range(4):
        history += ids(64, 10 + t)
        r = srv.generate(history, 24, top_logprobs=2)
        turns.append(GreedyTrace.from_response(r))
        cached.append(cached_tokens(r))
        history += output_ids(r)
    out["chat"], out["chat_cached"] = turns, cached
    out["long"] = traces(srv, [ids(40000, 5)], 24)
    return out


def test_radix_and_chunked_prefill_give_the_tokens_of_recomputing(model):
    with freekv(model, "freekv-default") as s:
        got = shared_prefix_and_chat(s)
        info = s.server_info()
    with freekv(model, "freekv-recompute", *RECOMPUTE) as s:
        want = shared_prefix_and_chat(s)
    print(f"cached tokens: shared {got['shared_cached']}, chat {got['chat_cached']} (radix on); "
          f"{want['shared_cached']}, {want['chat_cached']} (off)")
    assert info.get("disable_radix_cache") is False and info.get("chunked_prefill_size", 0) > 0
    assert got["shared_cached"] >= 16384 - 32 and want["shared_cached"] == 0
    assert all(c >= 20000 for c in got["chat_cached"][1:])
    agree("shared 16K prefix, radix on vs off", got["shared"], want["shared"])
    agree("4-turn chat over 20K, radix on vs off", got["chat"], want["chat"])
    agree("40K prompt, chunked vs one forward", got["long"], want["long"])


def test_shared_prefix_matches_dense_with_its_radix_cache(model):
    prefix = ids(16384, 21)
    prompts = [prefix + ids(n, 22 + i) for i, n in enumerate((200, 700))]
    with _server(model, "dense-radix", "--attention-backend", "flashinfer", "--page-size", "32",
                 "--disable-overlap-schedule") as s:
        s.generate(prefix, 1)
        want = traces(s, prompts, 32)
    # the budget covers the context; few rows of such large working sets keep the start short
    with freekv(model, "freekv-radix", "--freekv-select-tokens", "32768", "--max-running-requests", "4",
                "--cuda-graph-max-bs", "4") as s:
        s.generate(prefix, 1)
        got = traces(s, prompts, 32)
    agree("FreeKV (whole context) vs dense, both from the radix cache", got, want)


def test_frontend_fork_over_a_shared_prefix_and_chunked_prefill_beside_decodes(model):
    import sglang as sgl

    doc = " ".join(f"w{i}" for i in range(6000))  # a long shared prefix (~12K tokens)

    @sgl.function
    def forked(s, document):
        s += document + "\n"
        forks = s.fork(3)
        for i, f in enumerate(forks):
            f += f"Branch {i}:" + sgl.gen("out", max_tokens=16, temperature=0)
        s["outs"] = [f["out"] for f in forks]

    def run(srv):
        return forked.run(document=doc, backend=sgl.RuntimeEndpoint(srv.base))["outs"]

    with freekv(model, "freekv-fork", "--chunked-prefill-size", "4096") as s:
        got = run(s)
        # a 36K prompt prefilled in 4K chunks while 4 requests decode: everything completes, lengths exact
        with ThreadPoolExecutor(5) as ex:
            decoders = [ex.submit(s.generate, ids(3000, 40 + i), 256) for i in range(4)]
            time.sleep(2.0)
            long = ex.submit(s.generate, ids(36000, 50), 8)
            outs = [f.result() for f in decoders] + [long.result()]
        assert [len(output_ids(r)) for r in outs] == [256] * 4 + [8]
    with freekv(model, "freekv-fork-recompute", *RECOMPUTE) as s:
        want = run(s)
    print(f"fork outputs: {got} vs {want}")
    assert got == want


def test_more_distinct_prefixes_than_the_host_tier_holds_are_evicted_not_failed(model):
    """3x more distinct 16K prefixes than a 2 GiB host tier holds (random Llama: 16 KiB per token, so about
    131K tokens = 8 prefixes): every request completes, the server stays healthy (SGLang's idle check of the
    token pool passes), and the host tier is not full of leaked pages afterwards."""
    with freekv(model, "freekv-evict", "--freekv-host-memory-gb", "2") as s:
        total = s.server_info()["internal_states"][0]["freekv"]["host_tier_pages_total"]
        n_prefixes = 3 * (total * 32 // 16384)
        for i in range(n_prefixes):
            prefix = ids(16384, 100 + i)
            a, b = s.generate_many([prefix + ids(64, 1000 + i), prefix + ids(80, 2000 + i)], 8)
            assert len(output_ids(a)) == len(output_ids(b)) == 8
        time.sleep(3.0)  # idle: SGLang checks its pools for leaks
        fk = s.server_info()["internal_states"][0]["freekv"]
        assert s.proc.poll() is None, "the server exited"
        assert fk["working_set_rows_used"] == 0
        assert fk["host_tier_pages_used"] <= total  # cached prefixes may stay, nothing beyond the tier
        with open(s.log_path) as f:
            log = f.read()
        assert "leak" not in log.lower(), "SGLang reported a memory leak"
    print(f"{n_prefixes} distinct 16K prefixes over a {total}-page host tier: all served")
