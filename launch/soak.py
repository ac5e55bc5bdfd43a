"""Soak a FreeKV server under load, faults and bad input, then check that nothing was lost (issue 28).

One GPU, at most ``--budget-s`` seconds (540 by default, start-up included):

1. writes a KV-sensitive random Llama (:mod:`freekv_sglang.testing.random_llama`, 131072 positions, with the
   byte-level tokenizer of :func:`freekv_sglang.testing.shape_models.write_tokenizer`: greedy tokens depend on
   the KV cache, so a replay that matches means something) and starts a stock
   ``python -m sglang.launch_server --kv-retrieval freekv`` on it, with SGLang's defaults (radix cache and
   chunked prefill on) and ``--freekv-host-memory-gb`` sized from the mix: the host tier holds
   ``--tier-contexts`` full contexts and every burst needs ``--oversubscription`` times what it holds, so
   requests must queue (and may be retracted), never fail for lack of memory;
2. sends the mix (:func:`make_mix`, pure and seeded) burst after burst: prompts of 1 token to near the context
   (most short, some 32K-128K), outputs of 1 to 2048 tokens (mostly short), ``/generate``,
   ``/v1/completions`` and ``/v1/chat/completions``, streaming and not, ``n > 1``, stop strings, temperature
   sampling, shared prefixes (the radix cache), and faults: clients that disconnect mid-stream,
   ``/abort_request`` of running and of queued requests (by rid), ``/flush_cache`` under load, prompt plus
   ``max_new_tokens`` beyond the context;
3. on the idle server: ``/health``; no working-set row and no tier page held by a request (FreeKV's counts in
   ``/server_info``: pages in use less those only the radix cache holds), and after ``/flush_cache`` no host-tier
   page in use at all (the flush resets SGLang's allocators whole, so only the counts before it can show a
   leak); a sample of ``--replays`` completed greedy requests replayed one by
   one must give the tokens they got under load (up to rounding ties:
   :func:`freekv_sglang.testing.greedy_compare.compare_runs` over the log-probabilities recorded under load);
4. the bad-input catalogue (:func:`bad_inputs`), one input at a time with ``/health`` after each: each must get a
   4xx (or SGLang's error object or error event) with a message, never a 5xx, a hang or a crash. Inputs with
   token ids outside the vocabulary go last: SGLang 0.5.17 does not check them, and its embedding would take the
   server down (FreeKV refuses them, :mod:`freekv_sglang.request_checks`; last, a server without that check
   still reports everything else);
5. scans the server log for SGLang's leak reports (its idle check of the token and request pools) and writes
   ``soak.json`` and ``soak.md`` under ``--out`` (the Markdown is printed too).

A server that exits ends the run (a crash): what was not done is reported as not run.

Usage (GPU machine, repo root):
  python launch/soak.py --out soak-out
  python launch/soak.py --dry-run      # the mix, the host tier and the server command; no model, no server
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from freekv_sglang.provenance import commit_id  # noqa: E402
from freekv_sglang.testing.greedy_compare import GreedyTrace, compare_greedy, compare_runs  # noqa: E402

VOCAB = 49152
CONTEXT = 131072
PAGE = 32
#: Tokens kept between prompt + max_new_tokens and the context, so SGLang never trims max_new_tokens
#: (its scheduler caps them at context - 2 - prompt) and every token asked for can be checked.
MARGIN = 16
#: Tokens the chat template adds around a user message, at most (the shape models' ChatML adds 60: the default
#: system prompt and the role markers, one token a character).
CHAT_OVERHEAD = 96
ENDPOINTS = {"generate": "/generate", "completions": "/v1/completions", "chat": "/v1/chat/completions"}
STOP_STRINGS = ("t7", "t42", "t123", "t9")  # decoded filler tokens read " t<i>": these stop within a few tokens
#: Prefix lengths (tokens or, for chat, characters) of the shared prefixes (radix cache).
PREFIX_LENGTHS = (64, 192, 1024, 4096, 16384, 32768)
FAULTS = ("disconnect", "abort_running", "abort_queued", "over_context")
#: The outcome each kind of action must get (``answered``: any status but a 5xx, a hang or no answer).
EXPECT = {"request": "ok", "disconnect": "disconnected", "abort_running": "aborted", "abort_queued": "aborted",
          "over_context": "rejected", "flush": "answered"}
#: What SGLang's idle check logs (``raise_error_or_warn``) when a pool lost memory, and its debug checks.
LEAK_PATTERNS = ("memory leak detected", "Mem Leak Detected", "KV double free", "KV page use-after-free")
ERROR_PATTERNS = ("Traceback (most recent call last)", "CUDA error", "device-side assert", "FreeKVMemoryError")


# ============================================================================================ the mix (pure)
@dataclass(frozen=True)
class MixConfig:
    """What :func:`make_mix` draws. Buckets are ``(low, high, share)``; ``high=None`` means up to the context."""

    seed: int = 0
    requests: int = 1000  # generation requests, faults included (flushes and the last burst's top-up come on top)
    context: int = CONTEXT
    vocab: int = VOCAB
    page: int = PAGE
    tier_contexts: float = 2.0  # the host tier holds this many full-context requests
    oversubscription: float = 2.0  # each burst needs this many times what the host tier holds
    prompt_buckets: tuple = ((1, 256, 0.55), (257, 4096, 0.25), (4097, 32767, 0.14), (32768, None, 0.06))
    output_buckets: tuple = ((1, 16, 0.55), (17, 128, 0.25), (129, 512, 0.15), (513, 2048, 0.05))
    endpoint_shares: tuple = (("generate", 0.5), ("completions", 0.25), ("chat", 0.25))
    stream_share: float = 0.4
    n_share: float = 0.1  # of the non-streaming requests: n in 2-4 (sampled)
    stop_share: float = 0.1
    temperature_share: float = 0.3  # sampled with temperature 0.7 (n > 1 always is)
    prefix_share: float = 0.35  # start with one of the shared prefixes (where the prompt is long enough)
    fault_shares: tuple = (("disconnect", 0.02), ("abort_running", 0.02), ("abort_queued", 0.02),
                           ("over_context", 0.015))
    min_faults: int = 10  # at least this many of each fault
    spread_s: float = 2.0  # a burst's requests leave within this many seconds
    gaps_s: tuple = (0.5, 1.0, 3.0)  # idle time between bursts (SGLang's idle leak check runs then)
    replay_max_new: int = 128  # greedy /generate requests up to this output ...
    replay_max_prompt: int = 65536  # ... and this prompt record log-probabilities (replay candidates)


@dataclass(frozen=True)
class Spec:
    """One action of the mix. ``prompt_len`` counts the prefix; for chat it is characters of the user message
    (one token each with the byte-level tokenizer) and the template adds :data:`CHAT_OVERHEAD` at most."""

    idx: int
    kind: str  # request | disconnect | abort_running | abort_queued | over_context | flush
    endpoint: str | None = None  # a key of ENDPOINTS; None for a flush
    prompt_len: int = 0
    max_new: int = 0
    stream: bool = False
    n: int = 1
    temperature: float = 0.0
    stop: tuple = ()
    prefix: int = -1  # index into Mix.prefixes, or -1
    logprobs: bool = False  # record log-probabilities: a replay candidate
    after: int = 0  # disconnect / abort_running: after this many streamed chunks with tokens
    abort_after_s: float = 0.0  # abort_queued: POST /abort_request this long after sending
    burst: int = -1
    delay_s: float = 0.0  # after the start of its burst

    @property
    def expect(self) -> str:
        return EXPECT[self.kind]

    @property
    def exact(self) -> bool:
        """Every output must have exactly ``max_new`` tokens (``ignore_eos`` and no stop string)."""
        return self.kind == "request" and not self.stop

    @property
    def rid(self) -> str:
        return f"soak-{self.idx}"


@dataclass(frozen=True)
class Mix:
    config: MixConfig
    tier_tokens: int  # host-tier tokens the server is sized for
    host_gb: float  # --freekv-host-memory-gb giving that tier
    prefixes: tuple  # prefix lengths
    specs: tuple  # every Spec, ordered by burst then delay
    bursts: tuple  # per burst: (gap_s before it, demand in tokens)

    def burst_specs(self, b: int) -> list:
        return [s for s in self.specs if s.burst == b]


def kv_bytes_per_token(hf_config: dict) -> int:
    """Bytes of K and V of one token over all layers, bf16 (the host tier's dtype for a bf16 model)."""
    heads = hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    return hf_config["num_hidden_layers"] * 2 * hf_config.get("num_key_value_heads", heads) * head_dim * 2


def host_memory_gb(tier_tokens: int, page: int, bytes_per_token: int) -> float:
    """``--freekv-host-memory-gb`` whose tier holds ``tier_tokens`` (whole pages): the sizing keeps
    ``bytes // page_bytes - 1`` pages (page 0 is SGLang's padding page), so one page more, rounded up."""
    pages = -(-tier_tokens // page) + 1
    return math.ceil(pages * page * bytes_per_token / 2**30 * 1e6) / 1e6


def _quota(rng: random.Random, n: int, shares) -> list[int]:
    """``n`` bucket indices in the proportions ``shares`` (largest remainders), shuffled."""
    raw = [n * s for s in shares]
    counts = [int(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])[: n - sum(counts)]:
        counts[i] += 1
    out = [i for i, c in enumerate(counts) for _ in range(c)]
    rng.shuffle(out)
    return out


def _pick(rng: random.Random, weighted) -> str:
    names, weights = zip(*weighted)
    return rng.choices(names, weights)[0]


def _length(rng: random.Random, buckets, b: int, top: int | None, edges: dict, name: str, forced) -> int:
    """A length in bucket ``b`` (its upper bound at most ``top``): the first ``forced[0]`` draws of the first bucket
    take its low end and the first ``forced[1]`` of the last bucket its high end (``edges`` counts them)."""
    lo, hi, _ = buckets[b]
    hi = top if hi is None else hi if top is None else min(hi, top)
    for end, key, limit in ((0, "low", forced[0]), (len(buckets) - 1, "high", forced[1])):
        key = f"{name}_{key}"
        if b == end and edges.get(key, 0) < limit:
            edges[key] = edges.get(key, 0) + 1
            return lo if key.endswith("low") else hi
    return rng.randint(lo, hi)


def _draw_request(rng: random.Random, cfg: MixConfig, idx: int, pb: int, ob: int, edges: dict,
                  prefixes) -> Spec:
    """A plain request whose prompt falls in bucket ``pb`` and output in bucket ``ob``; ``edges`` counts the
    forced extremes (1-token prompt and output, prompts at the context's edge, 2048-token outputs)."""
    endpoint = _pick(rng, cfg.endpoint_shares)
    stream = rng.random() < cfg.stream_share
    max_new = _length(rng, cfg.output_buckets, ob, None, edges, "output", (2, 2))
    top = cfg.context - max_new - MARGIN - (CHAT_OVERHEAD if endpoint == "chat" else 0)
    prompt = _length(rng, cfg.prompt_buckets, pb, top, edges, "prompt", (2, 3))
    n = rng.choice((2, 3, 4)) if not stream and rng.random() < cfg.n_share else 1
    stop = (rng.choice(STOP_STRINGS),) if rng.random() < cfg.stop_share else ()
    temperature = 0.7 if n > 1 or rng.random() < cfg.temperature_share else 0.0
    prefix = -1
    if rng.random() < cfg.prefix_share:
        fits = [i for i, length in enumerate(prefixes) if length < prompt]
        prefix = rng.choice(fits) if fits else -1
    logprobs = (endpoint == "generate" and not stream and n == 1 and temperature == 0 and not stop
                and max_new <= cfg.replay_max_new and prompt <= cfg.replay_max_prompt)
    return Spec(idx, "request", endpoint, prompt, max_new, stream, n, temperature, stop, prefix, logprobs)


def _draw_fault(rng: random.Random, cfg: MixConfig, idx: int, kind: str) -> Spec:
    """A fault: long outputs for the streams cut short (512-2048 tokens at a 128K context), prompts of up to
    8192 tokens; over-context requests exceed the context by prompt plus output or by the prompt alone."""
    prompt = rng.randint(1, min(8192, cfg.context // 16))
    if kind == "disconnect":
        return Spec(idx, kind, rng.choice(tuple(ENDPOINTS)), prompt,
                    rng.randint(min(512, cfg.context // 64), min(2048, cfg.context // 16)), stream=True,
                    after=rng.randint(1, 16))
    if kind == "abort_running":
        return Spec(idx, kind, "generate", prompt,
                    rng.randint(min(1024, cfg.context // 32), min(2048, cfg.context // 16)), stream=True,
                    after=rng.randint(1, 8))
    if kind == "abort_queued":
        return Spec(idx, kind, "generate", prompt, rng.randint(64, min(512, cfg.context // 16)),
                    abort_after_s=round(rng.uniform(0.05, 0.3), 3))
    if kind == "over_context":
        endpoint = rng.choice(("generate", "completions"))
        if rng.random() < 0.2:  # the prompt alone reaches the context
            return Spec(idx, kind, endpoint, cfg.context + rng.randint(0, 64), rng.randint(1, 16))
        prompt = rng.randint(1, cfg.context - 1)
        return Spec(idx, kind, endpoint, prompt, cfg.context - prompt + rng.randint(1, 4096))
    raise ValueError(f"unknown fault {kind!r}")


def request_demand(spec: Spec, prefixes, seen: set) -> int:
    """Token slots ``spec`` holds at its peak: prompt (a shared prefix only the first time in ``seen``) plus
    ``n`` outputs. Rejected requests and flushes hold none."""
    if spec.kind in ("over_context", "flush"):
        return 0
    prompt = spec.prompt_len + (CHAT_OVERHEAD if spec.endpoint == "chat" else 0)
    if spec.prefix >= 0:
        key = (spec.endpoint == "chat", spec.prefix)
        if key in seen:
            prompt -= prefixes[spec.prefix]
        seen.add(key)
    return prompt + spec.n * spec.max_new


def make_mix(cfg: MixConfig = MixConfig()) -> Mix:
    """The seeded mix: ``cfg.requests`` generation requests (faults in their shares, at least ``cfg.min_faults``
    of each; the prompt and output buckets in their exact shares) cut into bursts that each need
    ``cfg.oversubscription`` times the host tier (a few plain requests more fill the last burst), one
    ``/flush_cache`` per burst, idle gaps between bursts."""
    rng = random.Random(f"freekv-soak/{cfg.seed}")
    tier = -(-int(cfg.tier_contexts * cfg.context) // cfg.page) * cfg.page
    faults = {k: max(cfg.min_faults, round(share * cfg.requests)) for k, share in cfg.fault_shares}
    plain = cfg.requests - sum(faults.values())
    if plain < 1:
        raise ValueError(f"{cfg.requests} requests leave none beside {sum(faults.values())} faults")
    kinds = ["request"] * plain + [k for k, c in faults.items() for _ in range(c)]
    rng.shuffle(kinds)
    pbs = iter(_quota(rng, plain, [b[2] for b in cfg.prompt_buckets]))
    obs = iter(_quota(rng, plain, [b[2] for b in cfg.output_buckets]))
    prefixes = PREFIX_LENGTHS
    edges: dict = {}
    drawn = [_draw_request(rng, cfg, i, next(pbs), next(obs), edges, prefixes) if k == "request"
             else _draw_fault(rng, cfg, i, k) for i, k in enumerate(kinds)]

    # bursts: add requests until the burst needs oversubscription x the tier; the last one is topped up with
    # plain requests (buckets drawn by their shares) until it needs as much
    groups, demands, seen, need = [[]], [0], set(), cfg.oversubscription * tier
    for spec in drawn:
        if demands[-1] >= need:
            groups.append([])
            demands.append(0)
            seen = set()
        groups[-1].append(spec)
        demands[-1] += request_demand(spec, prefixes, seen)
    while demands[-1] < need:
        pb, ob = (rng.choices(range(len(b)), [x[2] for x in b])[0] for b in (cfg.prompt_buckets, cfg.output_buckets))
        spec = _draw_request(rng, cfg, len(drawn), pb, ob, edges, prefixes)
        drawn.append(spec)
        groups[-1].append(spec)
        demands[-1] += request_demand(spec, prefixes, seen)

    specs, bursts, idx = [], [], len(drawn)
    for b, (group, demand) in enumerate(zip(groups, demands)):
        placed = []
        for s in group:
            # queued aborts leave last, when the burst fills the server
            delay = cfg.spread_s + 0.2 if s.kind == "abort_queued" else rng.uniform(0.0, cfg.spread_s)
            placed.append(dataclasses.replace(s, burst=b, delay_s=round(delay, 3)))
        placed.append(Spec(idx, "flush", burst=b, delay_s=round(rng.uniform(0.5, cfg.spread_s + 1.0), 3)))
        idx += 1
        specs += sorted(placed, key=lambda s: (s.delay_s, s.idx))
        bursts.append((0.0 if b == 0 else rng.choice(cfg.gaps_s), demand))
    return Mix(cfg, tier, 0.0, prefixes, tuple(specs), tuple(bursts))


def sized(mix: Mix, bytes_per_token: int) -> Mix:
    """``mix`` with ``host_gb`` set for a model of ``bytes_per_token``."""
    return dataclasses.replace(mix, host_gb=host_memory_gb(mix.tier_tokens, mix.config.page, bytes_per_token))


def _bucket_counts(values, buckets, context) -> dict:
    out = {}
    for lo, hi, _ in buckets:
        hi = context if hi is None else hi
        out[f"{lo}-{hi}"] = sum(lo <= v <= hi for v in values)
    return out


def mix_summary(mix: Mix) -> dict:
    """Counts of every category of the mix, the host tier and each burst's oversubscription."""
    cfg, specs = mix.config, mix.specs
    reqs = [s for s in specs if s.kind != "flush"]
    plain = [s for s in reqs if s.kind == "request"]
    over = [d / mix.tier_tokens for _, d in mix.bursts]
    count = lambda pred, xs=plain: sum(1 for s in xs if pred(s))  # noqa: E731
    return {
        "seed": cfg.seed, "requests": len(reqs), "plain_requests": len(plain),
        "flushes_under_load": count(lambda s: s.kind == "flush", specs),
        "faults": {k: count(lambda s, k=k: s.kind == k, reqs) for k in FAULTS},
        "endpoints": {e: count(lambda s, e=e: s.endpoint == e, reqs) for e in ENDPOINTS},
        "streaming": count(lambda s: s.stream, reqs), "n_gt_1": count(lambda s: s.n > 1),
        "stop_strings": count(lambda s: bool(s.stop)), "temperature": count(lambda s: s.temperature > 0),
        "shared_prefix": count(lambda s: s.prefix >= 0), "replay_candidates": count(lambda s: s.logprobs),
        "prompt_buckets": _bucket_counts([s.prompt_len for s in plain], cfg.prompt_buckets, cfg.context),
        "output_buckets": _bucket_counts([s.max_new for s in plain], cfg.output_buckets, cfg.context),
        "prompt_tokens": {"min": min(s.prompt_len for s in plain), "max": max(s.prompt_len for s in plain),
                          "total": sum(s.prompt_len for s in plain)},
        "max_new_tokens": {"min": min(s.max_new for s in plain), "max": max(s.max_new for s in plain),
                           "total": sum(s.max_new * s.n for s in plain)},
        "context": cfg.context, "tier_tokens": mix.tier_tokens, "host_memory_gb": mix.host_gb,
        "bursts": len(mix.bursts),
        "burst_demand_tokens": {"min": min(d for _, d in mix.bursts), "max": max(d for _, d in mix.bursts)},
        "oversubscription": {"min": round(min(over), 2), "median": round(statistics.median(over), 2),
                             "max": round(max(over), 2)},
    }


# ================================================================================= request bodies (pure)
def _tokens(key: str, n: int, vocab: int) -> list[int]:
    return random.Random(key).choices(range(100, vocab - 100), k=n)


def _text(key: str, n: int) -> str:
    return "".join(random.Random(key).choices("abcdefghijklmnopqrstuvwxyz     ", k=n))


def prompt_ids(mix: Mix, spec: Spec) -> list[int]:
    """Token ids of ``spec``'s prompt: its shared prefix, then its own tokens."""
    cfg = mix.config
    head = _tokens(f"{cfg.seed}/prefix/{spec.prefix}", mix.prefixes[spec.prefix], cfg.vocab) if spec.prefix >= 0 else []
    return head + _tokens(f"{cfg.seed}/req/{spec.idx}", spec.prompt_len - len(head), cfg.vocab)


def chat_text(mix: Mix, spec: Spec) -> str:
    """The user message of a chat ``spec``: its shared prefix, then its own characters."""
    seed = mix.config.seed
    head = _text(f"{seed}/chat-prefix/{spec.prefix}", mix.prefixes[spec.prefix]) if spec.prefix >= 0 else ""
    return head + _text(f"{seed}/chat/{spec.idx}", spec.prompt_len - len(head))


def request_body(mix: Mix, spec: Spec) -> dict:
    """The JSON body of ``spec`` for its endpoint. Plain requests without a stop string ignore EOS, so each
    output must have exactly ``max_new`` tokens."""
    sampling = {"temperature": spec.temperature}
    if spec.temperature > 0:
        sampling["top_p"] = 0.95
    if spec.stop:
        sampling["stop"] = list(spec.stop)
    if spec.n > 1:
        sampling["n"] = spec.n
    if spec.endpoint == "generate":
        body = {"input_ids": prompt_ids(mix, spec), "stream": spec.stream,
                "sampling_params": {"max_new_tokens": spec.max_new, "ignore_eos": True, **sampling}}
        if spec.n == 1:
            body["rid"] = spec.rid
        if spec.logprobs:
            body.update(return_logprob=True, top_logprobs_num=2)
        return body
    body = {"model": "default", "stream": spec.stream, "ignore_eos": True, **sampling}
    if spec.stream:
        body["stream_options"] = {"include_usage": True}
    if spec.endpoint == "completions":
        return {**body, "prompt": prompt_ids(mix, spec), "max_tokens": spec.max_new}
    return {**body, "messages": [{"role": "user", "content": chat_text(mix, spec)}],
            "max_completion_tokens": spec.max_new}


# ============================================================================ the bad-input catalogue (pure)
@dataclass(frozen=True)
class BadInput:
    name: str
    path: str
    body: bytes
    content_type: str = "application/json"
    may_succeed: bool = False  # a valid request in disguise: a normal answer passes too


def bad_inputs(vocab: int = VOCAB, context: int = CONTEXT) -> list[BadInput]:
    """Every malformed or out-of-range input the soak sends, in the order sent (out-of-vocabulary ids last)."""
    j = lambda obj: json.dumps(obj).encode()  # noqa: E731
    gen = lambda ids, **sp: j({"input_ids": ids, "sampling_params": {"max_new_tokens": 8, **sp}})  # noqa: E731
    cmpl = lambda **kw: j({"model": "default", "max_tokens": 8, **kw})  # noqa: E731
    chat = lambda **kw: j({"model": "default", "max_completion_tokens": 8, **kw})  # noqa: E731
    hi = [{"role": "user", "content": "hi"}]
    return [
        BadInput("generate: empty text", "/generate", j({"text": "", "sampling_params": {"max_new_tokens": 8}})),
        BadInput("generate: empty input_ids", "/generate", gen([])),
        BadInput("completions: empty prompt", "/v1/completions", cmpl(prompt="")),
        BadInput("completions: empty token list", "/v1/completions", cmpl(prompt=[])),
        BadInput("chat: no messages", "/v1/chat/completions", chat(messages=[])),
        BadInput("chat: empty user message", "/v1/chat/completions",
                 chat(messages=[{"role": "user", "content": ""}]), may_succeed=True),
        BadInput("generate: max_new_tokens -1", "/generate", gen([100, 101], max_new_tokens=-1)),
        BadInput("generate: max_new_tokens 10**12", "/generate", gen([100, 101], max_new_tokens=10**12)),
        BadInput("generate: max_new_tokens 'many'", "/generate", gen([100, 101], max_new_tokens="many")),
        BadInput("completions: max_tokens -5", "/v1/completions", cmpl(prompt=[100, 101], max_tokens=-5)),
        BadInput("chat: max_completion_tokens 10**9", "/v1/chat/completions",
                 chat(messages=hi, max_completion_tokens=10**9)),
        BadInput("generate: temperature -1", "/generate", gen([100, 101], temperature=-1.0)),
        BadInput("completions: n 0", "/v1/completions", cmpl(prompt=[100, 101], n=0)),
        BadInput("generate: prompt of the context's length", "/generate", gen([100] * context, max_new_tokens=1)),
        BadInput("generate: prompt + max_new_tokens = context + 1", "/generate",
                 gen([100] * (context - 64), max_new_tokens=65)),
        BadInput("generate: malformed JSON", "/generate", b'{"input_ids": [100, 101], "sampling_params": {'),
        BadInput("completions: malformed JSON", "/v1/completions", b'{"model": "default", "prompt": "hi",,}'),
        BadInput("chat: malformed JSON", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}]'),
        BadInput("generate: JSON array body", "/generate", b"[100, 101, 102]"),
        BadInput("generate: empty body", "/generate", b""),
        BadInput("generate: bytes that are not UTF-8", "/generate", b"\xff\xfe{\x00"),
        BadInput("chat: text/plain body", "/v1/chat/completions", chat(messages=hi), content_type="text/plain"),
        BadInput("generate: temperature 'hot'", "/generate", gen([100, 101], temperature="hot")),
        BadInput("generate: unknown sampling parameter", "/generate", gen([100, 101], max_new_tokenz=8)),
        BadInput("generate: token id 2**63 (beyond int64)", "/generate", gen([100, 2**63])),
        BadInput("generate: token id = vocabulary size", "/generate", gen([100, vocab, 101])),
        BadInput("generate (stream): token id = vocabulary size", "/generate",
                 j({"input_ids": [100, vocab], "sampling_params": {"max_new_tokens": 8}, "stream": True})),
        BadInput("completions: token id = vocabulary size + 1000", "/v1/completions", cmpl(prompt=[100, vocab + 1000])),
        BadInput("completions (stream): token id = vocabulary size", "/v1/completions",
                 cmpl(prompt=[100, vocab], stream=True)),
        BadInput("generate: negative token id", "/generate", gen([100, -1, 101])),
        BadInput("generate: token id 2**40", "/generate", gen([100, 2**40])),
    ]


def stream_error(text: str) -> str | None:
    """The first error of a server-sent-event body: an ``{"error": ...}`` event (SGLang's, the OpenAI API's) or a
    ``/generate`` event finished by an abort with a message (the scheduler's refusal); ``None`` if there is none
    (or ``text`` is not a stream)."""
    if not text.lstrip().startswith("data:"):
        return None
    for line in text.splitlines():
        payload = line.strip()[5:].strip() if line.strip().startswith("data:") else ""
        try:
            obj = json.loads(payload) if payload and payload != "[DONE]" else None
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        if "error" in obj:
            return error_message(payload) or "error event without a message"
        fr = (obj.get("meta_info") or {}).get("finish_reason")
        if isinstance(fr, dict) and fr.get("type") == "abort":
            return str(fr.get("message") or "")[:300] or "abort without a message"
    return None


def error_message(text: str) -> str:
    """The message of an error answer: SGLang's ``{"error": {"message"}}``, the OpenAI ``{"message"}``,
    FastAPI's ``{"detail"}``, a stream's error event, else the text itself (shortened)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return stream_error(text) or text.strip()[:300]
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
        if isinstance(err, str) and err:
            return err[:300]
        for key in ("message", "detail"):
            if obj.get(key):
                return (obj[key] if isinstance(obj[key], str) else json.dumps(obj[key]))[:300]
    return text.strip()[:300]


def is_error_object(text: str) -> bool:
    """A 200 answer that is SGLang's (or the OpenAI API's) error object, or a stream that ends in an error event
    or an abort, rather than a completion."""
    try:
        obj = json.loads(text)
    except ValueError:
        return stream_error(text) is not None
    return isinstance(obj, dict) and ("error" in obj or obj.get("object") == "error")


def judge_bad_input(bad: BadInput, status: int | None, text: str, failure: str, alive: bool,
                    healthy: bool) -> tuple[str, str]:
    """``(verdict, why)``: ``pass`` for a 4xx or an error object with a message (or a normal answer where
    ``bad.may_succeed``); ``FAIL`` for a 5xx, a 200 completion, an empty message or an unhealthy server;
    ``CRASH`` when the server exited; ``HANG`` when no answer came in time."""
    if not alive:
        return "CRASH", "the server exited"
    if status is None:
        return ("HANG" if failure == "timeout" else "FAIL"), failure or "no answer"
    if not healthy:
        return "FAIL", f"answered {status} but /health failed afterwards"
    msg = error_message(text)
    if 400 <= status < 500:
        return ("pass", "") if msg else ("FAIL", f"{status} without a message")
    if status == 200 and is_error_object(text):
        return ("pass", "") if msg else ("FAIL", "error object without a message")
    if status == 200:
        return ("pass", "served (a valid request)") if bad.may_succeed else ("FAIL", "accepted and served")
    return "FAIL", f"server error {status}"


# ============================================================================================ HTTP client
class Client:
    """HTTP/1.1 to the server, one connection per call (``http.client``, standard library only)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 30000):
        self.host, self.port = host, port

    def connect(self, timeout: float) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def call(self, method: str, path: str, body: bytes | dict | None = None, timeout: float = 60.0,
             content_type: str = "application/json") -> tuple[int | None, str, str]:
        """``(status, text, failure)``; ``status`` is None and ``failure`` says why (``timeout`` or the
        error) when no answer came."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn = self.connect(timeout)
        try:
            conn.request(method, path, body=data, headers={"Content-Type": content_type} if data is not None else {})
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace"), ""
        except (socket.timeout, TimeoutError):
            return None, "", "timeout"
        except (OSError, http.client.HTTPException) as e:
            return None, "", f"{type(e).__name__}: {e}"
        finally:
            conn.close()

    def get(self, path: str, timeout: float = 30.0):
        return self.call("GET", path, None, timeout)

    def post(self, path: str, body, timeout: float = 60.0):
        return self.call("POST", path, body, timeout)

    def healthy(self, timeout: float = 30.0) -> bool:
        return self.get("/health", timeout)[0] == 200

    def freekv_state(self) -> dict | None:
        """``internal_states[0]["freekv"]`` of ``/server_info`` (FreeKV's tier and row counts), or None."""
        status, text, _ = self.get("/server_info", 30)
        if status != 200:
            return None
        try:
            return json.loads(text)["internal_states"][0]["freekv"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None


@dataclass
class Result:
    """What one action got. ``klass``: ok / aborted / disconnected / rejected / answered / error."""

    idx: int
    kind: str
    endpoint: str | None
    status: int | None = None
    klass: str = ""
    problem: str = ""  # why the outcome is not what the spec expects
    message: str = ""  # the server's error message, if any
    outputs: int = 0  # completions (choices) received
    tokens: int = 0  # completion tokens, all outputs
    finishes: list = field(default_factory=list)  # finish reasons: length / stop / abort / ...
    ttft_s: float | None = None
    itl_s: list = field(default_factory=list)  # per-token gaps (/generate streams)
    sent_at: float = 0.0
    duration_s: float = 0.0
    output_ids: list | None = None  # replay candidates
    trace: dict | None = None  # replay candidates: meta_info with the log-probabilities


def _finish_type(fr) -> str:
    if isinstance(fr, dict):
        return str(fr.get("type"))
    return "none" if fr is None else str(fr)


def parse_generate(r: Result, obj) -> None:
    """Fill ``r`` from a non-streaming ``/generate`` answer (one dict, or a list for ``n > 1``)."""
    outs = obj if isinstance(obj, list) else [obj]
    r.outputs = len(outs)
    for o in outs:
        meta = o.get("meta_info", {})
        r.tokens += int(meta.get("completion_tokens", len(o.get("output_ids") or [])))
        r.finishes.append(_finish_type(meta.get("finish_reason")))
        if isinstance(meta.get("finish_reason"), dict) and meta["finish_reason"].get("message"):
            r.message = str(meta["finish_reason"]["message"])[:300]
    if len(outs) == 1 and "output_token_logprobs" in outs[0].get("meta_info", {}):
        meta = outs[0]["meta_info"]
        r.output_ids = list(outs[0].get("output_ids") or [t[1] for t in meta["output_token_logprobs"]])
        r.trace = {"meta_info": {k: meta[k] for k in ("output_token_logprobs", "output_top_logprobs") if k in meta}}


def parse_openai(r: Result, obj: dict) -> None:
    """Fill ``r`` from a non-streaming OpenAI answer."""
    choices = obj.get("choices") or []
    r.outputs = len(choices)
    r.finishes = [_finish_type(c.get("finish_reason")) for c in choices]
    r.tokens = int((obj.get("usage") or {}).get("completion_tokens") or 0)


def _events(resp):
    """The payload of each server-sent ``data:`` line, as it arrives."""
    for raw in resp:
        line = raw.decode(errors="replace").strip()
        if line.startswith("data:"):
            yield line[5:].strip()


class _Stream:
    """Accumulates a streamed answer: tokens, outputs, finish reasons, and per-token gaps (``/generate``)."""

    def __init__(self, r: Result, endpoint: str):
        self.r, self.endpoint, self.last, self.done = r, endpoint, None, False

    def feed(self, payload: str, now: float) -> bool:
        """Take one event; True when it carried new tokens (or, for the OpenAI API, new text)."""
        r = self.r
        if payload == "[DONE]":
            self.done = True
            return False
        try:
            obj = json.loads(payload)
        except ValueError:
            r.problem = f"unparsable stream event {payload[:80]!r}"
            return False
        if not isinstance(obj, dict):
            r.problem = f"unexpected stream event {payload[:80]!r}"
            return False
        if "error" in obj:
            r.message = error_message(payload)
            return False
        if self.endpoint == "generate":
            return self._generate(obj, now)
        usage = obj.get("usage") or {}
        if usage.get("completion_tokens") is not None:
            r.tokens = int(usage["completion_tokens"])
        new = False
        for c in obj.get("choices") or []:
            piece = c.get("text") if self.endpoint == "completions" else (c.get("delta") or {}).get("content")
            new = new or bool(piece)
            if c.get("finish_reason") is not None:
                r.finishes.append(_finish_type(c["finish_reason"]))
                r.outputs = len(r.finishes)  # one final chunk per choice
        return new

    def _generate(self, obj: dict, now: float) -> bool:
        r, meta = self.r, obj.get("meta_info", {})
        r.outputs = 1
        fr = meta.get("finish_reason")
        if fr is not None:
            r.finishes = [_finish_type(fr)]
            if isinstance(fr, dict) and fr.get("message"):
                r.message = str(fr["message"])[:300]
        new = int(meta.get("completion_tokens", r.tokens)) - r.tokens
        if new > 0:
            if self.last is not None:
                r.itl_s += [(now - self.last) / new] * new
            self.last = now
            r.tokens += new
        return new > 0


def _open_stream(client: Client, path: str, body: dict, timeout: float):
    """``(connection, socket, response)``: the socket is taken before the response, which may detach it."""
    conn = client.connect(timeout)
    conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    sock = conn.sock
    return conn, sock, conn.getresponse()


def run_stream(client: Client, spec: Spec, body: dict, r: Result, timeout: float) -> None:
    """A streaming request; ``disconnect`` closes the socket and ``abort_running`` posts ``/abort_request``
    after ``spec.after`` chunks with tokens."""
    conn, sock, resp = _open_stream(client, ENDPOINTS[spec.endpoint], body, timeout)
    try:
        r.status = resp.status
        if resp.status != 200:
            r.message = error_message(resp.read().decode(errors="replace"))
            return
        acc, seen = _Stream(r, spec.endpoint), 0
        for payload in _events(resp):
            if acc.feed(payload, time.perf_counter()):
                seen += 1
                if r.ttft_s is None:
                    r.ttft_s = time.perf_counter() - r.sent_at
                if seen == spec.after and spec.kind == "disconnect":
                    sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream
                    r.klass = "disconnected"
                    return
                if seen == spec.after and spec.kind == "abort_running":
                    client.post("/abort_request", {"rid": spec.rid}, 30)
            if acc.done:
                break
    finally:
        conn.close()


def run_plain(client: Client, spec: Spec, body: dict, r: Result, timeout: float) -> None:
    """A non-streaming request; ``abort_queued`` posts ``/abort_request`` ``spec.abort_after_s`` after sending."""
    timer = None
    if spec.kind == "abort_queued":
        timer = threading.Timer(spec.abort_after_s, client.post, ("/abort_request", {"rid": spec.rid}, 30))
        timer.start()
    try:
        status, text, failure = client.post(ENDPOINTS[spec.endpoint], body, timeout)
    finally:
        if timer is not None:
            timer.join()
    r.status = status
    if status is None:
        r.problem = failure
        return
    if status != 200 or is_error_object(text):
        r.message = error_message(text)
        return
    obj = json.loads(text)
    (parse_generate if spec.endpoint == "generate" else parse_openai)(r, obj)


def outcome(r: Result) -> str:
    """What an answer was: aborted, rejected (a 4xx, or an error object / error event with a message and no
    output), error (another status) or ok."""
    if r.status == 499 or "abort" in r.finishes or "abort" in r.message.lower():
        return "aborted"
    if 400 <= r.status < 500 or (r.status == 200 and r.message and not r.outputs):
        return "rejected"
    return "ok" if r.status == 200 else "error"


def classify(spec: Spec, r: Result) -> None:
    """Set ``r.klass`` (what happened) and ``r.problem`` (why it is not what ``spec.expect`` wants: then
    ``klass`` becomes ``error``). A request to abort that finished first counts as served."""
    if r.klass == "disconnected":
        return
    if r.status is None:
        r.klass, r.problem = "error", r.problem or "no answer"
        return
    if spec.kind == "flush":
        r.klass = "answered" if r.status < 500 else "error"
        r.problem = "" if r.klass == "answered" else f"server error {r.status}: {r.message}"
        return
    r.klass = outcome(r)
    if r.klass == "ok":
        r.problem = _output_problem(spec, r)
    elif r.klass == "rejected" and not r.message:
        r.problem = "rejected without a message"
    if r.klass == "ok" and spec.expect == "aborted" and not r.problem:
        return
    if r.klass != spec.expect and not r.problem:
        r.problem = f"expected {spec.expect}, got {r.klass} ({r.status}{': ' + r.message if r.message else ''})"
    if r.problem:
        r.klass = "error"


def _output_problem(spec: Spec, r: Result) -> str:
    """Why a completed answer lost something: outputs missing, tokens missing, an unexpected finish reason."""
    if r.problem:
        return r.problem
    if r.outputs != spec.n:
        return f"{r.outputs} outputs for n={spec.n}"
    want = spec.n * spec.max_new
    if spec.exact and (r.tokens != want or any(f != "length" for f in r.finishes)):
        return f"{r.tokens} tokens (want {want}), finish {r.finishes}"
    if not spec.exact and (r.tokens > want or any(f not in ("length", "stop") for f in r.finishes)):
        return f"{r.tokens} tokens (at most {want}), finish {r.finishes}"
    return ""


def execute(client: Client, mix: Mix, spec: Spec, timeout: float) -> Result:
    """Run one action of the mix and classify what it got (never raises)."""
    r = Result(spec.idx, spec.kind, spec.endpoint)
    try:
        if spec.kind == "flush":
            r.sent_at = time.perf_counter()
            r.status, text, r.problem = client.post("/flush_cache", b"", timeout)
            r.message = text.strip()[:200] if r.status != 200 else ""
        else:
            body = request_body(mix, spec)
            r.sent_at = time.perf_counter()
            (run_stream if spec.stream else run_plain)(client, spec, body, r, timeout)
    except (socket.timeout, TimeoutError):
        r.problem = "timeout"
        r.status = None
    except Exception as e:  # noqa: BLE001 - whatever broke, the action failed: an error, not a stuck thread
        r.problem = f"{type(e).__name__}: {e}"[:300]
        r.status = None if r.klass != "disconnected" else r.status
    r.duration_s = time.perf_counter() - r.sent_at
    classify(spec, r)
    return r


# ============================================================================================ the load
def run_burst(client: Client, mix: Mix, b: int, timeout: float) -> list[Result]:
    """Send burst ``b``: every action in its own thread at its delay; wait for all."""
    specs = mix.burst_specs(b)
    results: list = [None] * len(specs)
    t0 = time.perf_counter()

    def one(i: int, spec: Spec):
        time.sleep(max(0.0, t0 + spec.delay_s - time.perf_counter()))
        results[i] = execute(client, mix, spec, timeout)

    threads = [threading.Thread(target=one, args=(i, s), daemon=True) for i, s in enumerate(specs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + mix.config.spread_s + 60)
    for i, s in enumerate(specs):
        if results[i] is None:  # a thread still blocked past its timeout
            results[i] = Result(s.idx, s.kind, s.endpoint, klass="error", problem="no result (hung client)")
    return results


def run_load(client: Client, mix: Mix, deadline: float, timeout: float, alive=lambda: True,
             log=print) -> tuple[list[Result], list[int]]:
    """All bursts, each after its idle gap; bursts left at ``deadline`` or after the server exited are not
    run. Returns the results and the bursts not run."""
    results, skipped = [], []
    for b, (gap, demand) in enumerate(mix.bursts):
        if time.time() > deadline or not alive():
            skipped.append(b)
            continue
        time.sleep(gap)
        t0 = time.perf_counter()
        got = run_burst(client, mix, b, min(timeout, max(30.0, deadline + 60 - time.time())))
        results += got
        klasses = {}
        for r in got:
            klasses[r.klass] = klasses.get(r.klass, 0) + 1
        log(f"[soak] burst {b + 1}/{len(mix.bursts)}: {len(got)} actions, {demand / mix.tier_tokens:.2f}x the tier, "
            f"{time.perf_counter() - t0:.1f}s, {klasses}")
    return results, skipped


# ============================================================================================ the checks
def wait_state(client: Client, key: str, timeout: float, poll: float = 0.5) -> dict:
    """Poll FreeKV's state until ``key`` is 0 or ``timeout`` passes: ``{key: last value, ok, waited_s}``."""
    t0, value = time.time(), None
    while True:
        state = client.freekv_state()
        value = None if state is None else state.get(key)
        if value == 0 or time.time() - t0 > timeout:
            return {key: value, "ok": value == 0, "waited_s": round(time.time() - t0, 1)}
        time.sleep(poll)


def idle_and_flush(client: Client, timeout: float = 30.0) -> dict:
    """On an idle server: no working-set row and no tier page held by a request (``tier_pages_held``: pages in
    use less those only the radix cache holds); after ``/flush_cache`` no host-tier page in use. Only the first
    two can show a leak: the flush resets SGLang's allocators whole (when the server is idle), leaked pages
    included; the last shows that the flush ran."""
    rows = wait_state(client, "working_set_rows_used", timeout)
    held = wait_state(client, "tier_pages_held", timeout)
    status, text, failure = client.post(f"/flush_cache?timeout={timeout:g}", b"", timeout + 30)
    pages = wait_state(client, "host_tier_pages_used", timeout)
    return {"rows": rows, "held": held, "flush_status": status, "flush_answer": (text.strip() or failure)[:200],
            "pages": pages, "ok": rows["ok"] and held["ok"] and status == 200 and pages["ok"]}


def replay(client: Client, mix: Mix, results: list[Result], k: int, timeout: float) -> dict:
    """Replay ``k`` completed greedy requests (a seeded sample) one by one; compare with what they got under
    load: tokens, and log-probabilities up to rounding ties (:func:`compare_runs`)."""
    specs = {s.idx: s for s in mix.specs}
    done = sorted((r for r in results if r.klass == "ok" and r.trace and specs[r.idx].logprobs), key=lambda r: r.idx)
    sample = sorted(random.Random(f"freekv-soak/{mix.config.seed}/replay").sample(done, min(k, len(done))),
                    key=lambda r: r.idx)
    loaded, replayed, rows = [], [], []
    for r in sample:
        spec = specs[r.idx]
        body = request_body(mix, spec)
        body.pop("rid")  # a fresh rid: the request under load may still be known by its own
        status, text, failure = client.post("/generate", body, timeout)
        row = {"idx": r.idx, "prompt": spec.prompt_len, "max_new": spec.max_new}
        try:
            got = json.loads(text) if status == 200 else None
            trace = GreedyTrace.from_response(got) if got else None
        except ValueError as e:
            trace, failure = None, str(e)
        if trace is None:
            row.update(ok=False, why=f"replay failed: {status} {failure or error_message(text)}")
        else:
            under_load = GreedyTrace.from_response(r.trace)
            a = compare_greedy(trace, under_load)
            loaded.append(under_load)
            replayed.append(trace)
            row.update(ok=a.ok, exact=trace.tokens == under_load.tokens, equal_prefix=a.prefix,
                       max_logprob_diff=round(a.max_logprob_diff, 4), why=a.reason)
        rows.append(row)
    pooled = compare_runs(replayed, loaded) if replayed else None
    return {"candidates": len(done), "replayed": len(rows), "exact": sum(bool(x.get("exact")) for x in rows),
            "corrupted": sum(not x["ok"] for x in rows),
            "mean_logprob_diff": None if pooled is None else round(pooled.mean_logprob_diff, 5),
            "pooled_ok": None if pooled is None else pooled.ok, "rows": rows}


def run_bad_inputs(client: Client, catalogue: list[BadInput], alive=lambda: True, timeout: float = 60.0,
                   log=print) -> list[dict]:
    """Send each bad input, then ``/health``; stop at a crash (the rest are reported as not sent)."""
    out = []
    for bad in catalogue:
        if not alive():
            out.append({"input": bad.name, "path": bad.path, "status": None, "answer": "", "verdict": "not sent",
                        "why": "the server had exited"})
            continue
        status, text, failure = client.call("POST", bad.path, bad.body, timeout, bad.content_type)
        is_alive = alive()
        healthy = is_alive and client.healthy()
        verdict, why = judge_bad_input(bad, status, text, failure, is_alive, healthy)
        answer = (f"(served) {text[:80]}" if status == 200 and not is_error_object(text)
                  else error_message(text) if text else failure)
        out.append({"input": bad.name, "path": bad.path, "status": status, "answer": answer, "verdict": verdict,
                    "why": why})
        log(f"[soak] bad input {bad.name!r}: {status} {out[-1]['answer'][:100]!r} -> {verdict} {why}")
    return out


def scan_log(text: str) -> dict:
    """SGLang's leak reports and other errors in the server log."""
    lines = text.splitlines()
    leaks = [ln.strip()[:300] for ln in lines if any(p in ln for p in LEAK_PATTERNS)]
    errors = [ln.strip()[:300] for ln in lines if any(p in ln for p in ERROR_PATTERNS)]
    return {"leaks": len(leaks), "leak_lines": leaks[:20], "errors": len(errors), "error_lines": errors[:20]}


# ============================================================================================ the report
def percentile(xs, q: float) -> float:
    """Nearest-rank ``q``-quantile (0-1); NaN for no data."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def latency(results: list[Result]) -> dict:
    """TTFT (every streaming answer that completed) and inter-token latency (``/generate`` streams), ms."""
    ok = [r for r in results if r.klass == "ok"]
    ttft = [1000 * r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [1000 * x for r in ok for x in r.itl_s]

    def stats(xs):
        return {"p50": round(percentile(xs, 0.5), 2), "p99": round(percentile(xs, 0.99), 2), "n": len(xs)}

    return {"ttft_ms": stats(ttft), "itl_ms": stats(itl)}


def tally(mix: Mix, results: list[Result], skipped: list[int]) -> dict:
    """Requests served / aborted / rejected / lost, by kind, and the flushes' answers."""
    reqs = [r for r in results if r.kind != "flush"]
    count = lambda k: sum(r.klass == k for r in reqs)  # noqa: E731
    by_kind: dict = {}
    for r in results:
        by_kind.setdefault(r.kind, {}).setdefault(r.klass, 0)
        by_kind[r.kind][r.klass] += 1
    flushes: dict = {}
    for r in results:
        if r.kind == "flush":
            flushes[str(r.status)] = flushes.get(str(r.status), 0) + 1
    not_sent = sum(1 for s in mix.specs if s.burst in skipped and s.kind != "flush")
    return {"sent": len(reqs), "served": count("ok"), "aborted": count("aborted") + count("disconnected"),
            "disconnected": count("disconnected"), "rejected": count("rejected"), "errors": count("error"),
            "not_sent": not_sent, "bursts_not_run": len(skipped), "by_kind": by_kind, "flushes": flushes,
            "error_sample": [{"idx": r.idx, "kind": r.kind, "endpoint": r.endpoint, "status": r.status,
                              "problem": r.problem, "message": r.message} for r in results if r.klass == "error"][:25]}


#: The idle checks (no row or tier page held by a request; host tier empty after a flush), each a leak where it
#: fails.
IDLE_CHECKS = ("after_load", "after_replay", "after_bad_inputs")


def verdict(report: dict) -> dict:
    """The targets of issue 28: nothing lost, no leak, no crash, no corrupted replay, every bad input answered."""
    req, checks = report["requests"], report["checks"]
    replayed = checks.get("replay") or {}
    bad = report.get("bad_inputs") or []
    out = {
        "requests_sent": req["sent"],
        "lost_requests": req["errors"] + req["not_sent"],
        "leaks": (checks.get("log") or {}).get("leaks", 0) + sum(
            1 for key in IDLE_CHECKS if key in checks and not checks[key]["ok"]),
        "crashes": int(bool(report.get("server_exited"))),
        "corrupted_replays": replayed.get("corrupted", 0),
        "replays": replayed.get("replayed", 0),
        "bad_inputs_failed": sum(b["verdict"] != "pass" for b in bad),
        "healthy_after": bool(checks.get("healthy_after")),
    }
    out["pass"] = (out["requests_sent"] >= report["mix"]["requests"] and out["lost_requests"] == 0
                   and out["leaks"] == 0 and out["crashes"] == 0 and out["corrupted_replays"] == 0
                   and out["replays"] >= min(report.get("replays_wanted", 50), replayed.get("candidates", 0))
                   and out["bad_inputs_failed"] == 0 and out["healthy_after"])
    return out


def markdown(report: dict) -> str:
    """The printed report: the run, the mix, the outcome against the targets, and every bad input."""
    m, req, lat, v, checks = (report["mix"], report["requests"], report["latency"], report["verdict"],
                              report["checks"])
    rep = checks.get("replay") or {}
    lines = [f"card: {report['card']}; commit: {report['commit']}; model: random Llama (4 layers, KV-sensitive), "
             f"context {m['context']}; seed {m['seed']}; {report['duration_s']:.0f} s "
             f"(server ready after {report.get('server_ready_s') or float('nan'):.0f} s)", "",
             f"command: `{report['command']}`", "",
             f"mix: {m['requests']} requests ({m['plain_requests']} plain; faults {m['faults']}), "
             f"{m['flushes_under_load']} flushes under load, {m['bursts']} bursts at "
             f"{m['oversubscription']['min']}-{m['oversubscription']['max']}x (median "
             f"{m['oversubscription']['median']}x) a host tier of {m['tier_tokens']} tokens "
             f"({m['host_memory_gb']} GiB); endpoints {m['endpoints']}; {m['streaming']} streaming, "
             f"{m['n_gt_1']} n>1, {m['stop_strings']} stop strings, {m['temperature']} sampled, "
             f"{m['shared_prefix']} shared prefixes; prompts {m['prompt_buckets']}; outputs {m['output_buckets']}", "",
             "| check | result | target |", "|---|---|---|",
             f"| requests sent | {req['sent']} (not sent: {req['not_sent']}) | {m['requests']} |",
             f"| served / aborted (disconnected) / rejected | {req['served']} / {req['aborted']} "
             f"({req['disconnected']}) / {req['rejected']} | as the mix asks |",
             f"| lost (errors, not sent) | {v['lost_requests']} | 0 |",
             f"| TTFT p50 / p99 (streams) | {lat['ttft_ms']['p50']} / {lat['ttft_ms']['p99']} ms "
             f"(n={lat['ttft_ms']['n']}) | - |",
             f"| inter-token latency p50 / p99 | {lat['itl_ms']['p50']} / {lat['itl_ms']['p99']} ms "
             f"(n={lat['itl_ms']['n']}) | - |",
             f"| /flush_cache under load | {req['flushes']} | no 5xx |",
             f"| leaks (log reports + tier/row counts not back to 0) | {v['leaks']} | 0 |",
             f"| crashes (server exits) | {v['crashes']} | 0 |",
             f"| corrupted replays | {v['corrupted_replays']} of {v['replays']} ({rep.get('exact', 0)} token-exact, "
             f"mean dlogp {rep.get('mean_logprob_diff')}) | 0 |",
             f"| bad inputs not answered properly | {v['bad_inputs_failed']} of {len(report.get('bad_inputs') or [])} "
             f"| 0 |",
             f"| healthy at the end | {v['healthy_after']} | True |",
             f"| **verdict** | **{'PASS' if v['pass'] else 'FAIL'}** | |", "",
             "| bad input | status | answer | verdict |", "|---|---:|---|---|"]
    for b in report.get("bad_inputs") or []:
        answer = str(b["answer"]).replace("|", "\\|").replace("\n", " ")[:160]
        why = f": {b['why']}" if b["why"] else ""
        lines.append(f"| {b['input']} | {b['status']} | {answer} | {b['verdict']}{why} |")
    if req["error_sample"]:
        lines += ["", "first errors:"] + [f"- {e}" for e in req["error_sample"][:10]]
    return "\n".join(lines)


# ============================================================================================ driver
def card_name() -> str:
    if shutil.which("nvidia-smi") is None:
        return "unknown"
    r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"], capture_output=True,
                       text=True)
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "unknown"


def read_text(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def server_args(a, mix: Mix, model: str) -> list[str]:
    return ["--model-path", model, "--kv-retrieval", "freekv", "--freekv-host-memory-gb", repr(mix.host_gb),
            "--context-length", str(mix.config.context), *a.server_arg]


def write_model(folder: str, context: int) -> str:
    """The KV-sensitive random Llama with ``context`` positions and the byte-level tokenizer (reused if there)."""
    from freekv_sglang.testing.random_llama import RandomLlamaSpec, write_random_llama
    from freekv_sglang.testing.shape_models import write_tokenizer

    tok = write_tokenizer(os.path.join(folder, "tokenizer"))
    return str(write_random_llama(os.path.join(folder, "model"), RandomLlamaSpec(max_positions=context),
                                  tokenizer_from=tok))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="soak-out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--requests", type=int, default=1000, help="generation requests, faults included")
    p.add_argument("--tier-contexts", type=float, default=2.0, help="full contexts the host tier holds")
    p.add_argument("--oversubscription", type=float, default=2.0, help="each burst needs this x the host tier")
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--model-dir", default=os.path.join("/tmp", "freekv-soak-random-llama-128k"))
    p.add_argument("--port", type=int, default=30041)
    p.add_argument("--budget-s", type=float, default=540.0, help="the whole run, start-up included")
    p.add_argument("--reserve-s", type=float, default=150.0,
                   help="kept from the budget for the checks, replays and bad inputs after the load")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--request-timeout", type=float, default=240.0)
    p.add_argument("--strict-leak-check", action="store_true",
                   help="SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE=1: a leak stops the server (default: it is "
                        "logged, counted and the run goes on)")
    p.add_argument("--server-arg", action="append", default=[],
                   help="one more sglang.launch_server argument (repeat; e.g. --server-arg=--cuda-graph-max-bs "
                        "--server-arg=64)")
    p.add_argument("--commit", default=None, help="the commit under test, where git is not available")
    p.add_argument("--dry-run", action="store_true", help="print the mix and the server command, start nothing")
    return p.parse_args(argv)


def mix_for(a) -> Mix:
    from freekv_sglang.testing.random_llama import RandomLlamaSpec

    cfg = MixConfig(seed=a.seed, requests=a.requests, tier_contexts=a.tier_contexts,
                    oversubscription=a.oversubscription)
    return sized(make_mix(cfg), kv_bytes_per_token(RandomLlamaSpec(max_positions=cfg.context).config()))


def main(argv=None) -> int:
    a = parse_args(argv)
    t_start = time.time()
    mix = mix_for(a)
    summary = mix_summary(mix)
    if a.dry_run:
        print(json.dumps(summary, indent=1))
        print("python -m sglang.launch_server " + " ".join(server_args(a, mix, "MODEL")))
        return 0
    from freekv_sglang.serving import Server

    os.makedirs(a.out, exist_ok=True)
    model = write_model(a.model_dir, mix.config.context)
    env = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1" if a.strict_leak_check else "0"}
    srv = Server(server_args(a, mix, model), port=a.port, log_path=os.path.join(os.path.abspath(a.out), "server.log"),
                 start_timeout=a.start_timeout, env=env)
    report = {"card": card_name(), "commit": commit_id(a.commit), "mix": summary, "replays_wanted": a.replays,
              "command": "python -m sglang.launch_server " + " ".join(srv.args), "checks": {},
              "requests": tally(mix, [], list(range(len(mix.bursts)))), "latency": latency([]), "bad_inputs": []}
    client = Client(port=a.port)
    alive = lambda: srv.proc is not None and srv.proc.poll() is None  # noqa: E731
    try:
        srv.start()
        report["server_ready_s"] = srv.ready_after
        print(f"[soak] server ready after {srv.ready_after:.0f}s; {summary['requests']} requests in "
              f"{summary['bursts']} bursts, host tier {mix.tier_tokens} tokens ({mix.host_gb} GiB)", flush=True)
        results, skipped = run_load(client, mix, t_start + a.budget_s - a.reserve_s, a.request_timeout, alive,
                                    log=lambda s: print(s, flush=True))
        report["requests"], report["latency"] = tally(mix, results, skipped), latency(results)
        checks = report["checks"]
        if alive():
            checks["healthy_after_load"] = client.healthy()
            checks["after_load"] = idle_and_flush(client)
            checks["replay"] = replay(client, mix, results, a.replays, a.request_timeout)
            checks["after_replay"] = idle_and_flush(client)
        report["bad_inputs"] = run_bad_inputs(client, bad_inputs(mix.config.vocab, mix.config.context), alive,
                                              log=lambda s: print(s, flush=True))
        checks["healthy_after"] = alive() and client.healthy()
        if alive():
            checks["after_bad_inputs"] = idle_and_flush(client)
    except Exception as e:  # noqa: BLE001 - a server that does not start, or a bug here: report what there is
        report["failure"] = f"{type(e).__name__}: {str(e)[:2000]}"
        print(f"[soak] {report['failure']}", flush=True)
    finally:
        report["server_exited"] = srv.proc is not None and srv.proc.poll() is not None
        report["server_exit_code"] = srv.proc.poll() if srv.proc is not None else None
        srv.stop()
    report["checks"]["log"] = scan_log(read_text(srv.log_path))
    report["duration_s"] = time.time() - t_start
    report["verdict"] = verdict(report)
    with open(os.path.join(a.out, "soak.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    text = markdown(report)
    with open(os.path.join(a.out, "soak.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0 if report["verdict"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
