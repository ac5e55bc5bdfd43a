"""Section ``step``: the attention (FlashInfer and the Triton split decode) and the fused selection per layer
as a captured decode step runs them: 8 layers over their own buffers in one CUDA graph, replay time / 8.
The selection's part is in :mod:`kernel_bench.step_select`."""

from __future__ import annotations

import torch

from .common import BF16, D, DEV, HKV, HQ, LAYOUT, P, K, page_table
from .step_select import step_select
from .timing import Runner, layers_graph_ms, safe_or_nan


def sec_step(r: Runner, out: dict, quick: bool):
    """Attention and selection as a captured decode step sees them: 8 layers (4 with ``quick``), each over
    its own KV / working sets / digests, in one CUDA graph; per-layer time = replay time / layers (the
    graph's launch is paid once per step, not once per layer)."""
    nl = 4 if quick else 8
    g = torch.Generator(device=DEV).manual_seed(5)
    ctx = 32768
    for b in ((1, 8) if quick else (1, 8, 32)):
        res = {"layers": nl}
        seq, ip, ix, lp = page_table(b, ctx)
        qs = [torch.randn((b, HQ, D), generator=g, device=DEV).to(BF16) for _ in range(nl)]
        names = _sparse_layers(r, res, g, qs, seq, ip, ix, lp)  # frees its working sets before the dense caches
        res["dense_p32_ms"] = _dense_layers(r, b, ctx, g, qs)
        torch.cuda.empty_cache()
        out[f"decode_b{b}"] = res
        for name in names:
            v = res[f"sparse_{name}_ms"]
            r.row("step", f"decode {name}, 2048-token working set, b={b}, per layer of {nl} in a graph", 1e3 * v, "us",
                  f"{res['dense_p32_ms'] / v:.2f}x dense 32K ({1e3 * res['dense_p32_ms']:.1f} us)")
        r.save()

    step_select(r, out, quick, nl, g)


def _sparse_layers(r: Runner, res: dict, g: torch.Generator, qs, seq, ip, ix, lp) -> list[str]:
    """Each attention variant over its own 2048-token working set per layer, checked against FlashInfer's
    paged decode; the variants' names."""
    nl, b = len(qs), qs[0].shape[0]
    ws = [(torch.randn((b * LAYOUT.slots, P, HKV, D), generator=g, device=DEV).to(BF16),
           torch.randn((b * LAYOUT.slots, P, HKV, D), generator=g, device=DEV).to(BF16)) for _ in range(nl)]

    def planned(tensor_cores: bool):
        w = K.SparseDecode(DEV, use_cuda_graph=True, batch_size=b, max_slots=LAYOUT.slots,
                           use_tensor_cores=tensor_cores)
        w.kv_indices.copy_(ix)
        w.plan(K.page_table_indptr_host(seq, LAYOUT), w.kv_indices, K.last_page_len_host(seq, LAYOUT),
               HQ, HKV, D, P, BF16, BF16)
        return w

    sd = planned(True)
    ref = [sd.run(qs[i], *ws[i]).float() for i in range(nl)]
    # FlashInfer's decode kernels (CUDA cores) instead of its prefill kernels: SGLang's choice below GQA 4
    sdc = planned(False)
    locks = torch.zeros(b * HKV, dtype=torch.int32, device=DEV)

    def split(i, **kw):
        return K.split_decode_attention(qs[i], *ws[i], ip, ix, lp, max_slots=LAYOUT.slots, **kw)

    variants = {"flashinfer": lambda i: sd.run(qs[i], *ws[i]),
                "flashinfer_cuda_cores": lambda i: sdc.run(qs[i], *ws[i]),
                "triton_split": lambda i: split(i),
                "triton_split_1slot": lambda i: split(i, pages_per_iter=1),
                "triton_split_8x2": lambda i: split(i, n_split=8, pages_per_iter=2),
                "triton_split_fused": lambda i: split(i, locks=locks)}
    for name, fn in variants.items():
        def run(fn=fn):
            for i in range(nl):
                err = (fn(i).float() - ref[i]).abs().max().item()
                if err > 2e-2:
                    raise RuntimeError(f"layer {i} differs from FlashInfer's paged decode by {err}")
            return layers_graph_ms([lambda i=i: fn(i) for i in range(nl)])
        res[f"sparse_{name}_ms"] = safe_or_nan(r, "step", f"sparse {name} b={b}", run)
    return list(variants)


def _dense_layers(r: Runner, b: int, ctx: int, g: torch.Generator, qs) -> float:
    """Dense FlashInfer paged decode (page 32) over each layer's own ``ctx``-token cache, per layer (NaN on error)."""
    nl = len(qs)
    n_pages = b * ctx // 32
    dd = K.SparseDecode(DEV, use_cuda_graph=True, batch_size=b, max_slots=ctx // 32)
    dd.kv_indices.copy_(torch.arange(n_pages, dtype=torch.int32, device=DEV))
    dd.plan(torch.arange(b + 1, dtype=torch.int32) * (ctx // 32), dd.kv_indices,
            torch.full((b,), 32, dtype=torch.int32), HQ, HKV, D, 32, BF16, BF16)

    def dense():
        kv = [(torch.empty((n_pages, 32, HKV, D), dtype=BF16, device=DEV).normal_(generator=g),
               torch.empty((n_pages, 32, HKV, D), dtype=BF16, device=DEV).normal_(generator=g)) for _ in range(nl)]
        return layers_graph_ms([lambda i=i: dd.run(qs[i], *kv[i]) for i in range(nl)])

    return safe_or_nan(r, "step", f"dense b={b}", dense)
