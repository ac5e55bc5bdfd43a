#!/usr/bin/env python
"""Where a FreeKV decode step spends its time, below SGLang (one GPU, a few minutes).

Builds a :class:`~freekv_sglang.runtime.engine.FreeKVRuntime` with real attention shapes
(Llama-3.1-8B by default: 32 query / 8 KV heads, head dim 128, bf16; fewer layers than the
model, since every layer does the same work), prefills ``--context`` random tokens for each of
``bs`` requests, captures one whole decode step (all layers, side stream included) in a CUDA
graph and replays it. Reported per (variant, batch, query similarity):

* GPU ms per layer of the replayed step, next to FlashInfer dense paged decode over the
  full context (page size 1 and 32) for the same batch and heads, and to the bare FlashInfer
  call over the working set (the attention FreeKV cannot avoid);
* correction rate and recalled MiB per request per step (the runtime's GPU counters), and
  what that recall would cost at the pinned H2D ceiling measured in the same run.

Query locality is synthetic: each (layer, request, query head) has a fixed random direction
``u``, and the step-``t`` query is ``u + sigma * e_t`` with fresh noise, so consecutive queries
have cosine about ``--similarity``; ``0`` gives unrelated queries (what dummy weights produce,
the worst case for FreeKV). Keys are random.

Variants: ``freekv`` (defaults), ``freekv-keepM`` (residency hysteresis of ``M`` pages), ``freekv-overN``
(speculative over-fetch of ``N`` tokens of pages; ``freekv-keepM-overN`` both), ``sync``
(speculation off), ``skip`` (no host transfers);
``name@N`` runs the selected-page recall on a persistent grid of ``N`` programs, ``name+W`` with ``W`` warps
each, ``name:A`` with working-set attention kernel ``A`` (see ``launch/bench_variants.py``).
``--profile`` adds a torch.profiler table of CUDA kernels per step for each variant at the
largest batch.

Usage: ``python launch/profile_decode_step.py --batch-sizes 1 8 --similarity 0 0.95 --json out.json``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import graph_ms  # noqa: E402  (also makes freekv_sglang importable from a checkout)

from freekv_sglang.algorithm import WorkingSetLayout  # noqa: E402
from freekv_sglang.runtime.engine import FreeKVRuntime, RuntimeSettings  # noqa: E402
from freekv_sglang.runtime.sizing import ModelShape  # noqa: E402
from freekv_sglang.settings import load_settings  # noqa: E402
from bench_variants import apply_variant_env, base_options, parse_variant  # noqa: E402

DEV = torch.device("cuda")


def h2d_ceiling_gbps(nbytes: int = 256 * 2**20) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 5 * nbytes / (time.perf_counter() - t) / 1e9


def gpu_ms(fn, reps: int) -> float:
    """Mean GPU ms of ``fn`` over ``reps`` calls (CUDA events)."""
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def dense_layer_ms(bs: int, ctx: int, hq: int, hkv: int, d: int, page: int, dtype) -> float:
    """FlashInfer paged decode over ``ctx`` tokens per request (one layer), GPU ms."""
    import flashinfer

    n_pages = -(-ctx // page)
    k = torch.randn(bs * n_pages, page, hkv, d, device=DEV, dtype=dtype)
    v = torch.randn_like(k)
    ws = torch.empty(256 * 2**20, dtype=torch.uint8, device=DEV)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
    indptr = torch.arange(bs + 1, dtype=torch.int32, device=DEV) * n_pages
    indices = torch.arange(bs * n_pages, dtype=torch.int32, device=DEV)
    last = torch.full((bs,), ctx - (n_pages - 1) * page, dtype=torch.int32, device=DEV)
    w.plan(indptr, indices, last, hq, hkv, d, page, q_data_type=dtype, kv_data_type=dtype)
    q = torch.randn(bs, hq, d, device=DEV, dtype=dtype)
    return gpu_ms(lambda: w.run(q, (k, v)), 50)  # long enough that launch cost does not matter


class Case:
    """One runtime with ``bs`` prefilled requests and a captured decode step."""

    def __init__(self, args, variant: str, bs: int):
        self.args, self.bs = args, bs
        # "freekv@64": recall grid of 64 programs; "freekv:flashinfer": FlashInfer's attention
        variant, env = parse_variant(variant)
        L, hq, hkv, d = args.layers, args.q_heads, args.kv_heads, args.head_dim
        dtype = torch.bfloat16
        P = args.page_size
        variant, opts = base_options(variant)  # "freekv-keep4": hysteresis of 4 pages; "freekv-over512": over-fetch
        if opts.get("overfetch_tokens", 0) % P:
            raise ValueError(f"over-fetch of {opts['overfetch_tokens']} tokens is not a multiple of the page size {P}")
        m = opts.get("overfetch_tokens", 0) // P
        self.lay = lay = WorkingSetLayout(P, args.sink // P, args.select // P + m, args.window // P, m)
        self.shape = ModelShape(L, hq, hkv, d, dtype)
        R = bs
        max_ctx = args.max_context
        per_row = -(-(args.context + 64) // P)  # host pages per request (the rest of its row stays 0)
        n_pages = R * per_row + 1
        r2t = torch.zeros((R + 1, max_ctx), dtype=torch.int32)
        perm = torch.randperm(n_pages - 1) + 1  # scattered host pages, as a real allocator leaves them
        for r in range(1, R + 1):
            pages = perm[(r - 1) * per_row: r * per_row]
            r2t[r, :per_row * P] = (pages[:, None] * P + torch.arange(P)).flatten().int()
        self.r2t = r2t.to(DEV)
        if variant not in ("freekv", "sync", "skip"):
            raise ValueError(f"unknown variant base {variant!r}: freekv, freekv-keepM, freekv-overN, freekv-grid2, "
                             "sync or skip")
        settings = RuntimeSettings(lay, "mean", 0.9, variant != "sync", "skip" if variant == "skip" else "gather",
                                   keep_margin=opts.get("keep_margin", 0),
                                   page_scoring=opts.get("page_scoring", "quest"))
        self.rt = FreeKVRuntime(self.shape, settings, n_pages, R, self.r2t, max_batch=bs, device=DEV,
                                env=load_settings(apply_variant_env(env, dict(os.environ))))
        self.scale = 1 / math.sqrt(d)
        self.rows = torch.arange(1, bs + 1, device=DEV)
        self.lens = [args.context] * bs
        self.u = torch.nn.functional.normalize(torch.randn(L, bs, hq, d, device=DEV), dim=-1) * math.sqrt(d)
        # prefill: random prompt K/V into the host tier, digests, first selection
        loc = torch.cat([self.r2t[r, :n].long() for r, n in zip(range(1, bs + 1), self.lens)])
        T = sum(self.lens)
        for l in range(L):
            k = torch.randn(T, hkv, d, device=DEV, dtype=dtype)
            v = torch.randn(T, hkv, d, device=DEV, dtype=dtype)
            q = torch.randn(T, hq, d, device=DEV, dtype=dtype)
            q[[sum(self.lens[:i + 1]) - 1 for i in range(bs)]] = self.u[l].to(dtype)
            self.rt.store_tokens(l, k, v, loc)
            self.rt.prefill_layer(l, q, k, self.rows, self.lens, loc)
            del k, v, q
        # static graph inputs
        self.seq_s = torch.tensor(self.lens, device=DEV) + 1
        self.loc_s = torch.stack([self.r2t[r, n].long() for r, n in zip(range(1, bs + 1), self.lens)])
        self.q_s = torch.empty(L, bs, hq, d, device=DEV, dtype=dtype)
        self.k_s = torch.randn(L, bs, hkv, d, device=DEV, dtype=dtype)
        self.v_s = torch.randn(L, bs, hkv, d, device=DEV, dtype=dtype)
        self.out_s = torch.empty(L, bs, hq, d, device=DEV, dtype=dtype)
        self.similarity = 0.0
        self.new_queries()
        self.rt.plan_decode_host(bs, self.seq_s.cpu(), graph=True)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        torch.cuda.synchronize()

    def _step(self):
        rt = self.rt
        rt.plan_decode_device(self.rows, self.seq_s, graph=True)
        for l in range(self.shape.n_layers):
            self.out_s[l].copy_(rt.decode_layer(l, self.q_s[l], self.k_s[l], self.v_s[l], self.loc_s, self.scale))
        rt.finish_decode_step()

    def new_queries(self):
        c = self.similarity
        if c <= 0:
            self.q_s.copy_(torch.randn_like(self.q_s, dtype=torch.float32) * 1.0)
            return
        sigma = math.sqrt(max(1.0 / c - 1.0, 0.0))
        self.q_s.copy_(self.u + sigma * torch.randn_like(self.u))

    def measure(self, similarity: float, steps: int) -> dict:
        """Replay ``steps`` decode steps (fresh queries each, same history length), GPU time only."""
        self.similarity = similarity
        rt = self.rt
        for _ in range(3):  # settle the resident sets for this locality
            self.new_queries()
            self.graph.replay()
        torch.cuda.synchronize()
        rt.reset_stats()
        seq_cpu = self.seq_s.cpu()
        total = 0.0
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(steps):
            self.new_queries()
            rt.stats_counter.count_step(seq_cpu)  # the replay skips plan_decode_host
            a.record()
            self.graph.replay()
            b.record()
            b.synchronize()
            total += a.elapsed_time(b)
        st = rt.stats()
        return {"ms_per_layer": total / steps / self.shape.n_layers, "correction_rate": st["correction_rate"],
                "recall_mib_per_request_step_model": st["recall_bytes_per_request_step"] / 2**20
                * self.args.model_layers / self.shape.n_layers}

    def attention_only_ms(self) -> float:
        """The bare FlashInfer call over the working sets (one layer)."""
        rt = self.rt
        wk, wv = rt.layer_slots(0)
        return graph_ms(lambda: rt.attention(self.q_s[0], wk, wv, self.scale))

    def attention_variants(self) -> dict:
        """FlashInfer over the same working sets with its prefill (tensor-core) and decode kernels."""
        from freekv_sglang.kernels.page_table import last_page_len_host, page_table_indptr_host
        from freekv_sglang.kernels.sparse_decode import SparseDecode
        sl = self.seq_s.cpu()
        ip, lpl = page_table_indptr_host(sl, self.lay), last_page_len_host(sl, self.lay)
        idx = self.rt.attention.graph_wrappers[self.bs].kv_indices[: int(ip[-1])].clone()
        wk, wv = self.rt.layer_slots(0)
        sh = self.shape
        out = {}
        for tc in (True, False):
            try:
                sd = SparseDecode(DEV, use_tensor_cores=tc, use_cuda_graph=True, batch_size=self.bs,
                                  max_slots=self.lay.slots)
                sd.kv_indices[: idx.numel()].copy_(idx)
                sd.plan(ip, sd.kv_indices, lpl, sh.n_q_heads, sh.n_kv_heads, sh.head_dim, self.lay.page_size,
                        sh.dtype, sh.dtype)
                out["tensor_cores" if tc else "decode_kernel"] = graph_ms(
                    lambda: sd.run(self.q_s[0], wk, wv, self.scale)) * 1e3
            except Exception as e:  # noqa: BLE001
                out["tensor_cores" if tc else "decode_kernel"] = repr(e)[:200]
        return out

    def profile(self, steps: int = 5) -> str:
        from torch.profiler import ProfilerActivity, profile
        self.similarity = self.args.profile_similarity
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                self.new_queries()
                self.graph.replay()
            torch.cuda.synchronize()
        return prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)

    def close(self):
        del self.graph
        self.rt.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8, help="layers built (each does the same work)")
    ap.add_argument("--model-layers", type=int, default=32, help="layers of the model, to scale per-step figures")
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--context", type=int, default=32000)
    ap.add_argument("--max-context", type=int, default=131072, help="req_to_token width (SGLang's context length)")
    ap.add_argument("--page-size", type=int, default=32)
    ap.add_argument("--sink", type=int, default=512)
    ap.add_argument("--select", type=int, default=1024)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--similarity", type=float, nargs="+", default=[0.0, 0.9, 0.99])
    ap.add_argument("--variants", nargs="+", default=["freekv", "sync", "skip"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-similarity", type=float, default=0.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    h2d = h2d_ceiling_gbps()
    print(f"# {name}; torch {torch.__version__}; pinned H2D ceiling {h2d:.1f} GB/s; layers built {args.layers} "
          f"(figures per layer; x{args.model_layers} for a model step)", flush=True)
    res = {"device": name, "h2d_gbps": h2d, "args": vars(args), "rows": [], "dense": {}, "profiles": {}}
    for bs in args.batch_sizes:
        for page in (1, 32):
            ms = dense_layer_ms(bs, args.context, args.q_heads, args.kv_heads, args.head_dim, page, torch.bfloat16)
            res["dense"][f"bs{bs}_page{page}"] = ms
            print(f"dense FlashInfer decode bs {bs} ctx {args.context} page {page}: {ms * 1e3:.1f} us/layer", flush=True)
    print("variant  bs  similarity  us/layer  attn-only us  corr-rate  recall MiB/req/step  at-ceiling us/layer",
          flush=True)
    for variant in args.variants:
        for bs in args.batch_sizes:
            t0 = time.perf_counter()
            case = Case(args, variant, bs)
            attn = case.attention_only_ms()
            av = case.attention_variants()
            res.setdefault("attention_us", {})[f"{variant}_bs{bs}"] = av
            print(f"  FlashInfer over the working sets, us/layer: {av}", flush=True)
            for sim in args.similarity:
                m = case.measure(sim, args.steps)
                ceil_us = m["recall_mib_per_request_step_model"] * 2**20 * bs / (h2d * 1e9) * 1e6 / args.model_layers
                row = {"variant": variant, "bs": bs, "similarity": sim, "attention_only_ms": attn,
                       "ceiling_us_per_layer": ceil_us, **m}
                res["rows"].append(row)
                print(f"{variant:7s} {bs:3d}  {sim:10.2f}  {m['ms_per_layer'] * 1e3:8.1f}  {attn * 1e3:12.1f}  "
                      f"{m['correction_rate']:9.3f}  {m['recall_mib_per_request_step_model']:19.2f}  {ceil_us:19.1f}",
                      flush=True)
            if args.profile and bs == max(args.batch_sizes):
                res["profiles"][variant] = tab = case.profile()
                print(f"--- CUDA kernels, {variant}, bs {bs}, 5 steps x {args.layers} layers, similarity "
                      f"{args.profile_similarity}\n{tab}", flush=True)
            case.close()
            del case
            torch.cuda.empty_cache()
            print(f"  ({variant} bs {bs}: {time.perf_counter() - t0:.0f} s)", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
