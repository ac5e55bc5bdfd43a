"""launch/soak.py without a GPU: the seeded mix (reproducible, every category of issue 28 in its share, lengths
within the context, the 2x oversubscription of the host tier), the request bodies, the bad-input catalogue and its
judgement, the classification of answers, the report's arithmetic, and the client and check code against a fake
SGLang server on localhost (well-behaved, leaking, corrupting)."""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from launch_scripts import load_launch_script

soak = load_launch_script("soak")

DEFAULT = soak.make_mix()


# ============================================================================================ the mix
def test_the_mix_is_seeded_and_reproducible():
    again = soak.make_mix(soak.MixConfig(seed=0))
    assert again == DEFAULT
    other = soak.make_mix(soak.MixConfig(seed=1))
    assert other.specs != DEFAULT.specs
    spec = next(s for s in DEFAULT.specs if s.prefix >= 0 and s.endpoint == "generate")
    assert soak.prompt_ids(DEFAULT, spec) == soak.prompt_ids(again, spec)
    assert soak.request_body(DEFAULT, spec) == soak.request_body(again, spec)


def test_the_mix_covers_every_category_of_the_issue():
    m = soak.mix_summary(DEFAULT)
    assert m["requests"] >= 1000
    assert all(m["faults"][k] >= 10 for k in soak.FAULTS)
    assert m["flushes_under_load"] == m["bursts"] >= 5  # one /flush_cache under load per burst
    assert min(m["endpoints"].values()) >= 200  # /generate, completions and chat
    assert 300 <= m["streaming"] <= 500
    assert m["n_gt_1"] >= 30 and m["stop_strings"] >= 50 and m["temperature"] >= 200
    assert m["shared_prefix"] >= 150
    assert m["replay_candidates"] >= 80  # 50 replayed, from those that completed
    plain = m["plain_requests"]
    # prompts: most short, some 32K-128K, from 1 token to the context's edge; outputs mostly short, 1-2048
    shares = [b[2] for b in DEFAULT.config.prompt_buckets]
    assert [c / plain for c in m["prompt_buckets"].values()] == pytest.approx(shares, abs=0.015)
    assert m["prompt_buckets"]["32768-131072"] >= 40
    assert m["prompt_tokens"]["min"] == 1 and m["prompt_tokens"]["max"] >= soak.CONTEXT - 2048 - 2 * soak.MARGIN
    assert [c / plain for c in m["output_buckets"].values()] == pytest.approx(
        [b[2] for b in DEFAULT.config.output_buckets], abs=0.015)
    assert (m["max_new_tokens"]["min"], m["max_new_tokens"]["max"]) == (1, 2048)
    specs = [s for s in DEFAULT.specs if s.kind == "request"]
    assert any(s.n > 1 and s.endpoint == e for s in specs for e in soak.ENDPOINTS)
    assert all(not (s.stream and s.n > 1) for s in specs)
    assert all(s.temperature > 0 for s in specs if s.n > 1)
    assert {s.endpoint for s in specs if s.stream} == set(soak.ENDPOINTS)
    assert {s.endpoint for s in specs if s.prefix >= 0} == set(soak.ENDPOINTS)
    cands = [s for s in specs if s.logprobs]
    assert all(s.endpoint == "generate" and not s.stream and s.n == 1 and s.temperature == 0 and not s.stop
               for s in cands)


def test_lengths_stay_within_the_context_except_the_over_context_faults():
    for s in DEFAULT.specs:
        if s.kind == "flush":
            continue
        total = s.prompt_len + s.max_new + (soak.CHAT_OVERHEAD if s.endpoint == "chat" else 0)
        if s.kind == "over_context":
            assert s.prompt_len + s.max_new > soak.CONTEXT, s
        else:
            assert s.prompt_len >= 1 and s.max_new >= 1 and total <= soak.CONTEXT - soak.MARGIN, s
        if s.prefix >= 0:
            assert DEFAULT.prefixes[s.prefix] < s.prompt_len
    edge = [s for s in DEFAULT.specs if s.kind == "request"
            and s.prompt_len + s.max_new >= soak.CONTEXT - soak.MARGIN - soak.CHAT_OVERHEAD]
    assert len(edge) >= 3  # prompts that end at the context's edge


def test_bursts_oversubscribe_the_host_tier_twice_and_every_request_fits_it():
    from freekv_sglang.runtime.sizing import host_bytes_per_page, shape_from_hf_config
    from freekv_sglang.testing.random_llama import RandomLlamaSpec

    config = RandomLlamaSpec(max_positions=soak.CONTEXT).config()
    per_token = soak.kv_bytes_per_token(config)
    assert per_token == host_bytes_per_page(shape_from_hf_config(config), 1) == 8192
    mix = soak.sized(DEFAULT, per_token)
    assert mix.tier_tokens == 2 * soak.CONTEXT
    # the plugin's sizing keeps host_bytes // page_bytes - 1 pages (page 0 pads): exactly the tier
    page_bytes = host_bytes_per_page(shape_from_hf_config(config), soak.PAGE)
    assert int(float(repr(mix.host_gb)) * 2**30) // page_bytes - 1 == mix.tier_tokens // soak.PAGE
    demands = []
    for b in range(len(mix.bursts)):
        seen = set()
        demands.append(sum(soak.request_demand(s, mix.prefixes, seen) for s in mix.burst_specs(b)))
    assert demands == [d for _, d in mix.bursts]
    assert all(d >= 2 * mix.tier_tokens for d in demands)
    assert statistics.median(demands) <= 2.6 * mix.tier_tokens
    biggest = max(soak.request_demand(s, mix.prefixes, set()) for s in mix.specs)
    assert biggest <= mix.tier_tokens  # each request fits alone: the burst must queue, never fail
    assert [s.burst for s in mix.specs] == sorted(s.burst for s in mix.specs)
    for b in range(len(mix.bursts)):
        burst = mix.burst_specs(b)
        queued = [s for s in burst if s.kind == "abort_queued"]
        assert all(q.delay_s > max(s.delay_s for s in burst if s.kind == "request") for q in queued)
    assert any(gap >= 3.0 for gap, _ in mix.bursts)  # idle time for SGLang's leak check


def test_oversubscription_and_tier_follow_the_options():
    mix = soak.make_mix(soak.MixConfig(tier_contexts=3.0, oversubscription=1.5, requests=1200))
    assert mix.tier_tokens == 3 * soak.CONTEXT
    assert all(d >= 1.5 * mix.tier_tokens for _, d in mix.bursts)
    m = soak.mix_summary(mix)
    assert 1200 <= m["requests"] <= 1300 and m["faults"]["disconnect"] == 24  # the top-up adds plain requests


def test_request_bodies_follow_the_spec():
    specs = {s.kind + "/" + (s.endpoint or "") + ("/s" if s.stream else ""): s for s in DEFAULT.specs}
    g = next(s for s in DEFAULT.specs if s.logprobs)
    body = soak.request_body(DEFAULT, g)
    assert len(body["input_ids"]) == g.prompt_len and body["rid"] == g.rid
    assert body["sampling_params"] == {"max_new_tokens": g.max_new, "ignore_eos": True, "temperature": 0.0}
    assert body["return_logprob"] and body["top_logprobs_num"] == 2
    n = next(s for s in DEFAULT.specs if s.n > 1 and s.endpoint == "generate")
    body = soak.request_body(DEFAULT, n)
    assert "rid" not in body and body["sampling_params"]["n"] == n.n and body["sampling_params"]["temperature"] > 0
    c = specs["request/completions/s"]
    body = soak.request_body(DEFAULT, c)
    assert body["prompt"] == soak.prompt_ids(DEFAULT, c) and body["max_tokens"] == c.max_new
    assert body["stream_options"] == {"include_usage": True} and body["ignore_eos"]
    chat = next(s for s in DEFAULT.specs if s.endpoint == "chat" and s.stop and s.prefix >= 0)
    body = soak.request_body(DEFAULT, chat)
    text = body["messages"][0]["content"]
    assert len(text) == chat.prompt_len and body["max_completion_tokens"] == chat.max_new
    assert body["stop"] == list(chat.stop)
    other = next(s for s in DEFAULT.specs if s.endpoint == "chat" and s.prefix == chat.prefix and s.idx != chat.idx)
    cut = DEFAULT.prefixes[chat.prefix]
    assert soak.chat_text(DEFAULT, other)[:cut] == text[:cut] and soak.chat_text(DEFAULT, other)[cut:] != text[cut:]
    a, b = [s for s in DEFAULT.specs if s.prefix == 2 and s.endpoint != "chat"][:2]
    assert soak.prompt_ids(DEFAULT, a)[:1024] == soak.prompt_ids(DEFAULT, b)[:1024]
    assert all(100 <= t < soak.VOCAB - 100 for t in soak.prompt_ids(DEFAULT, a))


# ============================================================================================ bad input
def test_the_bad_input_catalogue_covers_the_issue():
    cat = soak.bad_inputs()
    names = [b.name for b in cat]
    assert len(set(names)) == len(names) >= 20
    for needle in ("empty text", "empty input_ids", "empty prompt", "no messages", "max_new_tokens -1",
                   "max_new_tokens 10**12", "max_tokens -5", "malformed JSON", "negative token id",
                   "vocabulary size"):
        assert any(needle in n for n in names), needle
    assert {b.path for b in cat} == set(soak.ENDPOINTS.values())
    vocab = [i for i, b in enumerate(cat) if "token id" in b.name]
    assert vocab == list(range(len(cat) - len(vocab), len(cat)))  # last: they may take SGLang 0.5.17 down
    for b in cat:
        if "malformed" in b.name or "not UTF-8" in b.name or "empty body" in b.name:
            with pytest.raises(ValueError):
                json.loads(b.body)
        else:
            json.loads(b.body)
    longest = next(b for b in cat if "context's length" in b.name)
    assert len(json.loads(longest.body)["input_ids"]) == soak.CONTEXT


@pytest.mark.parametrize("status, text, failure, alive, healthy, may, want", [
    (400, '{"error": {"message": "input_ids cannot be empty."}}', "", True, True, False, "pass"),
    (422, '{"detail": [{"msg": "JSON decode error"}]}', "", True, True, False, "pass"),
    (200, '{"object": "error", "message": "bad", "code": 400}', "", True, True, False, "pass"),
    (200, '{"text": "x", "meta_info": {}}', "", True, True, True, "pass"),
    (200, '{"text": "x", "meta_info": {}}', "", True, True, False, "FAIL"),
    (400, "", "", True, True, False, "FAIL"),
    (500, '{"error": {"message": "boom"}}', "", True, True, False, "FAIL"),
    (400, '{"error": {"message": "x"}}', "", True, False, False, "FAIL"),
    (None, "", "timeout", True, True, False, "HANG"),
    (None, "", "ConnectionResetError: x", False, False, False, "CRASH"),
    # streams: SGLang's error event (a refusal in the HTTP server) and the scheduler's abort with a message
    (200, 'data: {"error": {"message": "input_ids[1] = 49152 is outside"}}\n\ndata: [DONE]\n\n', "", True, True,
     False, "pass"),
    (200, 'data: {"text": "", "meta_info": {"finish_reason": {"type": "abort", "message": "outside", '
          '"status_code": 400}}}\n\ndata: [DONE]\n\n', "", True, True, False, "pass"),
    (200, 'data: {"text": "x", "meta_info": {"finish_reason": {"type": "length"}}}\n\ndata: [DONE]\n\n', "", True,
     True, False, "FAIL"),
])
def test_judge_bad_input(status, text, failure, alive, healthy, may, want):
    bad = soak.BadInput("x", "/generate", b"{}", may_succeed=may)
    assert soak.judge_bad_input(bad, status, text, failure, alive, healthy)[0] == want


def test_error_message_reads_every_error_shape():
    assert soak.error_message('{"error": {"message": "m1"}}') == "m1"
    assert soak.error_message('{"object": "error", "message": "m2"}') == "m2"
    assert soak.error_message('{"detail": [{"msg": "m3"}]}') == '[{"msg": "m3"}]'
    assert soak.error_message("Cache not flushed\n") == "Cache not flushed"
    assert soak.error_message('data: {"text": "a"}\n\ndata: {"error": {"message": "m4"}}\n\ndata: [DONE]') == "m4"
    assert soak.error_message('data: {"meta_info": {"finish_reason": {"type": "abort", "message": "m5"}}}') == "m5"
    assert soak.stream_error('data: {"meta_info": {"finish_reason": {"type": "length"}}}') is None
    assert soak.stream_error('{"error": {"message": "not a stream"}}') is None


# ============================================================================================ classification
def _result(kind="request", status=200, outputs=1, tokens=8, finishes=("length",), message="", **kw):
    return soak.Result(0, kind, "generate", status=status, outputs=outputs, tokens=tokens, finishes=list(finishes),
                       message=message, **kw)


@pytest.mark.parametrize("spec, result, klass", [
    (soak.Spec(0, "request", "generate", 5, 8), _result(), "ok"),
    (soak.Spec(0, "request", "generate", 5, 8), _result(tokens=7), "error"),  # a token lost
    (soak.Spec(0, "request", "generate", 5, 8, n=2), _result(outputs=1), "error"),
    (soak.Spec(0, "request", "generate", 5, 8, stop=("t7",)), _result(tokens=3, finishes=("stop",)), "ok"),
    (soak.Spec(0, "request", "generate", 5, 8, stop=("t7",)), _result(tokens=9), "error"),
    (soak.Spec(0, "request", "generate", 5, 8), _result(finishes=("abort",)), "error"),
    (soak.Spec(0, "abort_queued", "generate", 5, 8), _result(tokens=0, finishes=("abort",)), "aborted"),
    (soak.Spec(0, "abort_queued", "generate", 5, 8),
     _result(status=499, outputs=0, tokens=0, finishes=(), message="Request soak-0 was aborted"), "aborted"),
    (soak.Spec(0, "abort_running", "generate", 5, 8), _result(), "ok"),  # finished before the abort
    (soak.Spec(0, "abort_running", "generate", 5, 8),
     _result(tokens=3, finishes=(), message="Request soak-0 was aborted"), "aborted"),  # an error event
    (soak.Spec(0, "over_context", "generate", 5, 8),
     _result(status=400, outputs=0, finishes=(), message="exceeds the context"), "rejected"),
    (soak.Spec(0, "over_context", "generate", 5, 8), _result(status=400, outputs=0, finishes=()), "error"),
    (soak.Spec(0, "over_context", "generate", 5, 8), _result(), "error"),  # accepted beyond the context
    (soak.Spec(0, "request", "generate", 5, 8), _result(status=503, outputs=0, message="x"), "error"),
    (soak.Spec(0, "flush"), _result(kind="flush", status=400, message="not flushed: pending requests"), "answered"),
    (soak.Spec(0, "flush"), _result(kind="flush", status=500), "error"),
    (soak.Spec(0, "request", "generate", 5, 8), _result(status=None, problem="timeout"), "error"),
])
def test_classify(spec, result, klass):
    soak.classify(spec, result)
    assert result.klass == klass, result.problem
    assert bool(result.problem) == (klass == "error")


# ============================================================================================ report
def test_percentile_and_latency():
    assert soak.percentile(list(range(1, 101)), 0.5) == 50 and soak.percentile(list(range(1, 101)), 0.99) == 99
    assert soak.percentile([3.0], 0.99) == 3.0 and math.isnan(soak.percentile([], 0.5))
    rs = [_result(ttft_s=0.1 * i, itl_s=[0.01, 0.02]) for i in range(1, 11)]
    rs.append(_result(status=400, outputs=0, message="x", ttft_s=99.0))  # not ok: not counted
    rs[-1].klass = "rejected"
    for r in rs[:-1]:
        r.klass = "ok"
    lat = soak.latency(rs)
    assert lat["ttft_ms"] == {"p50": 500.0, "p99": 1000.0, "n": 10}
    assert lat["itl_ms"] == {"p50": 10.0, "p99": 20.0, "n": 20}


def _report(**over):
    mix = soak.make_mix(soak.MixConfig(requests=1000))
    results = [soak.Result(s.idx, s.kind, s.endpoint, status=200, klass=soak.EXPECT[s.kind]) for s in mix.specs]
    report = {"card": "NVIDIA H100 80GB HBM3", "commit": "abc1234", "mix": soak.mix_summary(mix), "replays_wanted": 50,
              "command": "python -m sglang.launch_server ...", "duration_s": 400.0, "server_ready_s": 60.0,
              "requests": soak.tally(mix, results, []), "latency": soak.latency(results),
              "checks": {"healthy_after": True, "after_load": {"ok": True}, "after_replay": {"ok": True},
                         "replay": {"candidates": 90, "replayed": 50, "corrupted": 0, "exact": 48},
                         "log": {"leaks": 0}},
              "bad_inputs": [{"input": b.name, "path": b.path, "status": 400, "answer": "a | b", "verdict": "pass",
                              "why": ""} for b in soak.bad_inputs()],
              "server_exited": False}
    report.update(over)
    report["verdict"] = soak.verdict(report)
    return report


def test_verdict_and_markdown():
    good = _report()
    assert good["verdict"]["pass"] and good["requests"]["served"] == good["mix"]["plain_requests"]
    assert good["requests"]["aborted"] == sum(good["mix"]["faults"][k] for k in
                                              ("disconnect", "abort_running", "abort_queued"))
    text = soak.markdown(good)
    assert "**PASS**" in text and "NVIDIA H100" in text and "abc1234" in text
    assert all(b.name in text for b in soak.bad_inputs()) and "a \\| b" in text
    assert not _report(server_exited=True)["verdict"]["pass"]
    leaky = _report()
    leaky["checks"]["after_load"] = {"ok": False}
    assert soak.verdict(leaky)["leaks"] == 1 and not soak.verdict(leaky)["pass"]
    corrupt = _report()
    corrupt["checks"]["replay"]["corrupted"] = 2
    assert not soak.verdict(corrupt)["pass"]
    short = _report()
    short["requests"] = dict(short["requests"], not_sent=100)
    assert soak.verdict(short)["lost_requests"] == 100
    bad = _report()
    bad["bad_inputs"][-1]["verdict"] = "CRASH"
    assert soak.verdict(bad)["bad_inputs_failed"] == 1
    assert "**FAIL**" in soak.markdown(dict(bad, verdict=soak.verdict(bad)))


def test_scan_log_finds_sglang_leak_reports():
    log = ("INFO ok\nWARNING pool memory leak detected! [full] total=10, available=9\n"
           "req_to_token_pool memory leak detected!available_size=3\nTraceback (most recent call last):\n")
    got = soak.scan_log(log)
    assert got["leaks"] == 2 and got["errors"] == 1


def test_dry_run_prints_the_mix_and_the_command(capsys):
    assert soak.main(["--dry-run", "--requests", "1000", "--server-arg=--cuda-graph-max-bs",
                      "--server-arg=64"]) == 0
    out = capsys.readouterr().out
    assert '"requests": 1012' in out  # 1000 and the last burst's top-up
    cmd = out.strip().splitlines()[-1]
    assert cmd.startswith("python -m sglang.launch_server --model-path MODEL --kv-retrieval freekv "
                          "--freekv-host-memory-gb 2.000245 --context-length 131072")
    assert "--disable-radix-cache" not in cmd and cmd.endswith("--cuda-graph-max-bs 64")


# ============================================================================================ fake server
SMALL = soak.MixConfig(seed=5, requests=60, context=2048, tier_contexts=1.0,
                       prompt_buckets=((1, 64, 0.6), (65, 512, 0.3), (513, None, 0.1)),
                       output_buckets=((1, 8, 0.7), (9, 32, 0.3)), min_faults=3, spread_s=0.2, gaps_s=(0.0,))


class FakeSGLang(ThreadingHTTPServer):
    """Enough of SGLang's HTTP API for the soak's client code: deterministic 'greedy' tokens from the prompt,
    streams of one token a millisecond, aborts by rid, FreeKV's counts in /server_info. ``leak`` keeps a
    working-set row held; ``corrupt`` shifts tokens of requests replayed after the load."""

    daemon_threads = True

    def __init__(self, vocab=soak.VOCAB, context=SMALL.context, leak=False, corrupt=False):
        super().__init__(("127.0.0.1", 0), Handler)
        self.vocab, self.context, self.leak, self.corrupt = vocab, context, leak, corrupt
        self.aborted, self.running, self.lock = set(), 0, threading.Lock()
        self.pages, self.seen = 0, set()

    def state(self):
        # pages: one per request, left to the 'radix cache' once it ends (freed by a flush); ``leak`` keeps a row
        # and a page held as a lost request would
        held = self.running + int(self.leak)
        return {"working_set_rows_used": held, "working_set_rows_total": 64, "tier_pages_held": held,
                "tier_pages_cached": self.pages, "host_tier_pages_used": self.pages + held,
                "host_tier_pages_total": 128}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send(self, status, obj, ctype="application/json"):
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            return self.send(200, b"")
        if self.path == "/server_info":
            return self.send(200, {"internal_states": [{"freekv": self.server.state()}]})
        self.send(404, {"detail": "Not Found"})

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.startswith("/flush_cache"):
            if self.server.running:
                return self.send(400, b"Cache not flushed: there are running requests.\n", "text/plain")
            self.server.pages = 0
            return self.send(200, b"Cache flushed.\n", "text/plain")
        if self.headers.get("Content-Type") != "application/json":
            return self.send(422, {"detail": [{"msg": "Unsupported Media Type"}]})
        try:
            body = json.loads(raw)
        except ValueError:
            return self.send(422, {"detail": [{"msg": "JSON decode error"}]})
        if not isinstance(body, dict):
            return self.send(422, {"detail": [{"msg": "expected an object"}]})
        if self.path == "/abort_request":
            self.server.aborted.add(body.get("rid"))
            return self.send(200, b"")
        try:
            self.answer(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # a client that disconnected

    def answer(self, body):
        openai = self.path.startswith("/v1/")
        if openai:
            sp = {"max_new_tokens": body.get("max_tokens", body.get("max_completion_tokens", 16)),
                  "n": body.get("n", 1), "stop": body.get("stop")}
            if "prompt" in body:
                ids = body["prompt"] if isinstance(body["prompt"], list) else [ord(c) for c in body["prompt"]]
            else:  # the chat template adds tokens around each message
                msgs = body.get("messages") or []
                ids = [1, 10, 11] + [ord(c) for m in msgs for c in m.get("content", "")] if msgs else []
        else:
            sp = body.get("sampling_params") or {}
            ids = body.get("input_ids")
            ids = ids if ids is not None else [ord(c) for c in body.get("text", "")]
        new, n = sp.get("max_new_tokens", 16), sp.get("n", 1)
        known = {"max_new_tokens", "n", "stop", "temperature", "top_p", "ignore_eos"}
        error = (("empty prompt" if not ids else None)
                 or (f"unknown sampling parameter {sorted(set(sp) - known)}" if set(sp) - known else None)
                 or ("temperature must be a number"
                     if not isinstance((body if openai else sp).get("temperature", 0), (int, float)) else None)
                 or ("max_new_tokens must be an integer" if not isinstance(new, int) else None)
                 or ("max_new_tokens must be at least 0" if new < 0 else None)
                 or ("n must be at least 1" if not isinstance(n, int) or n < 1 else None)
                 or ("temperature must be non-negative" if (body if openai else sp).get("temperature", 0) < 0 else None)
                 or (f"input_ids out of the vocabulary" if any(not 0 <= t < self.server.vocab for t in ids) else None)
                 or (f"Requested token count exceeds the model's maximum context length of {self.server.context}"
                     if len(ids) + new > self.server.context else None))
        if error:
            return self.send(400, {"object": "error", "message": error} if openai else {"error": {"message": error}})
        key = (self.path, tuple(ids), new)
        shift = 1 if self.server.corrupt and key in self.server.seen else 0
        self.server.seen.add(key)
        toks = [(sum(ids) * 31 + i + shift) % self.server.vocab for i in range(new)]
        if sp.get("stop"):
            toks = toks[: min(new, 3)]
        rid = body.get("rid")
        with self.server.lock:
            self.server.running += 1
            self.server.pages += 1
        try:
            if body.get("stream"):
                return self.stream(openai, toks, new, rid)
            time.sleep(0.002 * len(toks))
            aborted = rid in self.server.aborted
            outs = [self.output(openai, toks[:0] if aborted else toks, new, aborted) for _ in range(n)]
        finally:
            with self.server.lock:
                self.server.running -= 1
        if openai:
            return self.send(200, {"choices": [dict(o, index=i) for i, o in enumerate(outs)],
                                   "usage": {"completion_tokens": sum(o["n"] for o in outs)}})
        self.send(200, outs[0] if n == 1 else outs)

    @staticmethod
    def finish_reason(toks, new, aborted):
        return "abort" if aborted else ("length" if len(toks) == new else "stop")

    def output(self, openai, toks, new, aborted):
        fr = self.finish_reason(toks, new, aborted)
        if openai:
            return {"text": "x" * len(toks), "finish_reason": fr, "n": len(toks)}
        lp = [[-0.1, t, None] for t in toks]
        top = [[[-0.1, t, None], [-2.0, (t + 1) % self.server.vocab, None]] for t in toks]
        return {"text": "x", "output_ids": toks, "meta_info": {
            "completion_tokens": len(toks), "finish_reason": {"type": fr}, "output_token_logprobs": lp,
            "output_top_logprobs": top}}

    def stream(self, openai, toks, new, rid):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        done = 0
        for i, t in enumerate(toks):
            if rid in self.server.aborted:
                break
            time.sleep(0.001)
            done = i + 1
            chunk = ({"choices": [{"index": 0, "text": "x", "delta": {"content": "x"}, "finish_reason": None}]}
                     if openai else {"meta_info": {"completion_tokens": done, "finish_reason": None}})
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.flush()
        fr = self.finish_reason(toks[:done], new, rid in self.server.aborted)
        last = ([{"choices": [{"index": 0, "text": "", "delta": {}, "finish_reason": fr}]},
                 {"choices": [], "usage": {"completion_tokens": done}}] if openai
                else [{"meta_info": {"completion_tokens": done, "finish_reason": {"type": fr}}}])
        for chunk in last:
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


@pytest.fixture
def fake():
    servers = []

    def start(**kw):
        srv = FakeSGLang(**kw)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv, soak.Client(port=srv.server_address[1])

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_the_client_and_the_checks_against_a_fake_server(fake):
    srv, client = fake()
    mix = soak.make_mix(SMALL)
    summary = soak.mix_summary(mix)
    assert summary["requests"] >= 60 and summary["replay_candidates"] >= 3
    results, skipped = soak.run_load(client, mix, time.time() + 120, 30.0, log=lambda s: None)
    assert not skipped and len(results) == len(mix.specs)
    t = soak.tally(mix, results, skipped)
    assert t["errors"] == 0, t["error_sample"]
    assert t["sent"] == summary["requests"] and t["disconnected"] == summary["faults"]["disconnect"]
    assert t["rejected"] == summary["faults"]["over_context"]
    assert t["served"] + t["aborted"] + t["rejected"] == t["sent"]
    assert t["by_kind"]["abort_running"].get("aborted", 0) >= 1
    lat = soak.latency(results)
    assert lat["ttft_ms"]["n"] >= 5 and lat["itl_ms"]["n"] > 0
    after = soak.idle_and_flush(client, timeout=5)
    assert after["ok"] and after["flush_status"] == 200
    rep = soak.replay(client, mix, results, 50, 30.0)
    assert rep["replayed"] == rep["candidates"] >= 3 and rep["corrupted"] == 0 and rep["exact"] == rep["replayed"]
    bad = soak.run_bad_inputs(client, soak.bad_inputs(soak.VOCAB, SMALL.context), log=lambda s: None)
    assert [b["verdict"] for b in bad] == ["pass"] * len(bad), [b for b in bad if b["verdict"] != "pass"]
    assert all(b["answer"] for b in bad)


def test_the_checks_catch_a_leak_and_a_corrupted_replay(fake):
    srv, client = fake(leak=True, corrupt=True)
    mix = soak.make_mix(SMALL)
    results, _ = soak.run_load(client, mix, time.time() + 120, 30.0, log=lambda s: None)
    after = soak.idle_and_flush(client, timeout=1)
    assert not after["ok"] and after["rows"]["working_set_rows_used"] == 1
    assert not after["held"]["ok"] and after["held"]["tier_pages_held"] == 1
    assert after["flush_status"] == 200 and after["pages"]["ok"] is False  # this fake's flush keeps the leak
    rep = soak.replay(client, mix, results, 50, 30.0)
    assert rep["corrupted"] == rep["replayed"] >= 3  # the tokens moved with no near-tie to excuse it


def test_a_leak_the_flush_would_hide_is_caught_before_it(fake):
    """SGLang's /flush_cache resets its allocators whole: pages lost by a request come back, and only the count of
    pages held by requests before the flush shows them."""
    srv, client = fake()
    base = srv.state
    srv.state = lambda: dict(base(), tier_pages_held=base()["tier_pages_held"] + int(srv.pages > 0))
    srv.pages = 3  # the radix cache's pages and one leaked, all freed by the flush
    after = soak.idle_and_flush(client, timeout=1)
    assert after["rows"]["ok"] and after["flush_status"] == 200 and after["pages"]["ok"]
    assert not after["held"]["ok"] and after["held"]["tier_pages_held"] == 1 and not after["ok"]


def test_a_dead_server_is_a_crash_and_stops_the_bad_inputs(fake):
    srv, client = fake()
    calls = {"n": 0}

    def alive():
        calls["n"] += 1
        return calls["n"] <= 3  # checked before and after each input: dies while the second is sent

    bad = soak.run_bad_inputs(client, soak.bad_inputs(soak.VOCAB, SMALL.context)[:3], alive, log=lambda s: None)
    assert [b["verdict"] for b in bad] == ["pass", "CRASH", "not sent"]


def test_chat_prompts_are_one_token_a_character_plus_the_template(tmp_path):
    """The chat mix counts a message's characters as tokens and the template as at most CHAT_OVERHEAD: true of
    the byte-level tokenizer the soak serves (shape_models.write_tokenizer)."""
    from transformers import AutoTokenizer

    from freekv_sglang.testing.shape_models import write_tokenizer

    tok = AutoTokenizer.from_pretrained(str(write_tokenizer(tmp_path / "tok")))
    spec = next(s for s in DEFAULT.specs if s.endpoint == "chat" and s.prefix >= 0 and s.prompt_len < 5000)
    text = soak.chat_text(DEFAULT, spec)
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a BatchEncoding in newer transformers
    assert len(tok(text, add_special_tokens=False)["input_ids"]) == len(text) == spec.prompt_len
    assert spec.prompt_len < len(ids) <= spec.prompt_len + soak.CHAT_OVERHEAD
