"""Section ``recall``: the runtime's ``recall_selected`` (CUDA graph) and ``recall_gather`` /
``recall_staged`` / ``recall_per_page`` GB/s on Llama-8B-shaped work against the H2D ceiling, sweeps of
the persistent grid sizes, and the recall with a GPU tier. :class:`RecallWork` also serves ``overlap``
and ``interfere``."""

from __future__ import annotations

import math

import torch

from .common import BF16, D, DEV, HKV, LAYOUT, MIB, NSEL, P, K
from .timing import Runner, bench_ms, ceiling, gbps, graph_ms, ratio_note, safe, wall_ms


class RecallWork:
    """Host store (pinned) + working set + piece lists of Llama-8B-shaped recalls."""

    def __init__(self, n_host_pages: int, max_batch: int):
        self.host_k = torch.empty((n_host_pages, HKV, P, D), dtype=BF16, pin_memory=True)
        self.host_v = torch.empty((n_host_pages, HKV, P, D), dtype=BF16, pin_memory=True)
        self.ws_k = torch.empty((max_batch * LAYOUT.slots, P, HKV, D), dtype=BF16, device=DEV)
        self.ws_v = torch.empty_like(self.ws_k)
        self.n_host = n_host_pages

    def pieces(self, b: int, frac: float, seed: int = 0):
        g = torch.Generator(device=DEV).manual_seed(seed)
        page = torch.randint(1, self.n_host, (b, HKV, NSEL), generator=g, device=DEV)
        slot = (torch.arange(b, device=DEV) * LAYOUT.slots + LAYOUT.n_sink).view(b, 1, 1) + torch.arange(NSEL, device=DEV)
        slot = slot.expand(b, HKV, NSEL)
        head = torch.arange(HKV, device=DEV).view(1, HKV, 1).expand(b, HKV, NSEL)
        valid = torch.rand((b, HKV, NSEL), generator=g, device=DEV) < frac
        # compacted like pieces_from_selection: valid pieces first
        order = torch.argsort((~valid).reshape(-1).to(torch.int8), stable=True)
        v = valid.reshape(-1)[order]
        lists = [torch.where(v, x.reshape(-1)[order], -1).int().contiguous() for x in (page, slot, head)]
        n_valid = int(valid.sum())
        return lists, n_valid, n_valid * 2 * P * D * 2

    @staticmethod
    def gather_blocks(lists) -> int:
        """Blocks the gather splits ``lists`` into: the largest useful persistent grid."""
        return math.ceil(lists[0].numel() * P / max(1, min(8192 // D, 256)))

    def selected_lists(self, b: int, frac: float, seed: int = 0):
        """Inputs of ``recall_selected`` (the runtime's path): per (request, KV head) recall lists
        with ``frac`` of the ``NSEL`` slots missing (valid entries first), and a req_to_token map
        from logical pages to random host pages."""
        g = torch.Generator(device=DEV).manual_seed(seed)
        n_logical = 1024
        host_page = torch.randint(1, self.n_host, (b, n_logical), generator=g, device=DEV)
        r2t = (host_page[:, :, None] * P + torch.arange(P, device=DEV)).reshape(b, -1).int().contiguous()
        valid = torch.rand((b, HKV, NSEL), generator=g, device=DEV) < frac
        n_valid_row = valid.sum(-1, keepdim=True)
        t = torch.arange(NSEL, device=DEV)
        ok = t < n_valid_row
        slot = torch.where(ok, t, -1).int()
        page = torch.where(ok, torch.randint(0, n_logical, (b, HKV, NSEL), generator=g, device=DEV), -1).int()
        rows = torch.arange(b, device=DEV)
        n_valid = int(valid.sum())
        return (slot, page, r2t, rows), n_valid, n_valid * 2 * P * D * 2

    def selected(self, lists, **kw):
        slot, page, r2t, rows = lists
        K.recall_selected(self.host_k, self.host_v, self.ws_k, self.ws_v, slot, page, r2t, rows, page_size=P,
                          slot_base=LAYOUT.slots, select_slot0=LAYOUT.n_sink, **kw)

    def gather(self, lists, **kw):
        K.recall_gather(self.host_k, self.host_v, self.ws_k, self.ws_v, *lists, **kw)

    def staged(self, lists):
        K.recall_staged(self.host_k, self.host_v, self.ws_k, self.ws_v, *lists)

    def per_page(self, lists):
        K.recall_per_page(self.host_k, self.host_v, self.ws_k, self.ws_v, *lists)


def _missing(frac: float) -> str:
    return "all" if frac == 1.0 else "15%"


def _key(frac: float) -> str:
    return "all" if frac == 1.0 else "p15"


def sec_recall(r: Runner, out: dict, quick: bool):
    work = RecallWork(4096 if quick else 8192, 32)
    r.state["recall_work"] = work
    h2d = ceiling(r, "h2d_gbps")
    for b in ((1, 8) if quick else (1, 8, 32)):
        for frac in (1.0, 0.15):
            out[f"b{b}_{_key(frac)}"] = _recall_case(r, work, b, frac, h2d)
            r.save()
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    _gather_grid_sweep(r, out, work, sms)
    _selected_grid_sweep(r, out, work, sms, h2d)
    _selected_gpu_tier(r, out, work, h2d)
    # graph replay (how the runtime launches it)
    lists, n_valid, nbytes = work.pieces(8, 1.0, seed=7)
    t = graph_ms(lambda: work.gather(lists))
    out["gather_graph_b8_all_gbps"] = gbps(nbytes, t)
    r.row("recall", "gather b=8 all missing, CUDA-graph replay", out["gather_graph_b8_all_gbps"], "GB/s")


def _recall_case(r: Runner, work: RecallWork, b: int, frac: float, h2d: float | None) -> dict:
    """Every recall of batch ``b`` with ``frac`` of the selected pages missing."""
    lists, n_valid, nbytes = work.pieces(b, frac, seed=b)
    tag = f"b={b} {_missing(frac)} missing ({nbytes / MIB:.1f} MiB)"
    res = {"pieces": n_valid, "bytes": nbytes}
    t = bench_ms(lambda: work.gather(lists))
    res["gather_ms"], res["gather_gbps"] = t, gbps(nbytes, t)
    r.row("recall", f"gather   {tag}", res["gather_gbps"], "GB/s", ratio_note(res["gather_gbps"], h2d, "H2D"))
    reps = 2 if (b >= 32 and frac == 1.0) else 3
    for name, fn in (("staged", work.staged), ("per_page", work.per_page)):
        t = safe(r, "recall", f"{name} {tag}", lambda: wall_ms(lambda: fn(lists), reps=reps))
        if t is None:
            continue
        res[f"{name}_ms"], res[f"{name}_gbps"] = t, gbps(nbytes, t)
        r.row("recall", f"{name.replace('_', '-'):<8} {tag}", res[f"{name}_gbps"], "GB/s",
              ratio_note(res[f"{name}_gbps"], h2d, "H2D"))
    sel, n_sel, sel_bytes = work.selected_lists(b, frac, seed=b)
    t = graph_ms(lambda: work.selected(sel))
    res["selected_graph_gbps"] = gbps(sel_bytes, t)
    r.row("recall", f"selected (runtime path), graph b={b} {_missing(frac)} missing "
          f"({sel_bytes / MIB:.1f} MiB)", res["selected_graph_gbps"], "GB/s",
          ratio_note(res["selected_graph_gbps"], h2d, "H2D"))
    return res


def _gather_grid_sweep(r: Runner, out: dict, work: RecallWork, sms: int):
    """The gather's persistent grid size, up to one program per block."""
    for b, frac in ((8, 1.0), (8, 0.15)):
        lists, n_valid, nbytes = work.pieces(b, frac, seed=100 + b)
        n_blocks = work.gather_blocks(lists)
        sweep = {}
        for nprog in sorted({8, 16, 32, 64, sms, 2 * sms, 8 * sms, n_blocks}):
            if nprog > n_blocks:
                continue
            t = bench_ms(lambda: work.gather(lists, num_programs=nprog))
            sweep[nprog] = gbps(nbytes, t)
            r.row("recall", f"gather grid={nprog:<5} b={b} {_missing(frac)} missing", sweep[nprog],
                  "GB/s", f"{nprog / sms:.2f} programs/SM")
        out[f"grid_sweep_b{b}_{_key(frac)}"] = sweep


def _selected_grid_sweep(r: Runner, out: dict, work: RecallWork, sms: int, h2d: float | None):
    """The runtime's selected-page recall over per-(request, head) lists, by grid size."""
    for b, frac in ((8, 1.0), (8, 0.15)):
        sel, n_sel, sel_bytes = work.selected_lists(b, frac, seed=200 + b)
        sweep = {}
        for nprog in sorted({8, 16, 32, 64, sms}):
            t = graph_ms(lambda: work.selected(sel, num_programs=nprog))
            sweep[nprog] = gbps(sel_bytes, t)
            r.row("recall", f"selected grid={nprog:<5} b={b} {_missing(frac)} missing, graph",
                  sweep[nprog], "GB/s", ratio_note(sweep[nprog], h2d, "H2D"))
        out[f"selected_grid_sweep_b{b}_{_key(frac)}"] = sweep


def _selected_gpu_tier(r: Runner, out: dict, work: RecallWork, h2d: float | None):
    """The runtime's recall with a GPU tier (--freekv-gpu-tier-gb): pages past the host tier's come from HBM."""
    gk = torch.empty_like(work.host_k, device=DEV)
    gv = torch.empty_like(work.host_v, device=DEV)
    sel, n_sel, sel_bytes = work.selected_lists(8, 1.0, seed=300)
    for split, what in ((1, "all pages in the GPU tier"), (work.n_host // 2, "half the pages in the GPU tier")):
        def tiered(split=split):
            slot, page, r2t, rows = sel
            K.recall_selected(work.host_k[:split], work.host_v[:split], work.ws_k, work.ws_v, slot, page, r2t, rows,
                              page_size=P, slot_base=LAYOUT.slots, select_slot0=LAYOUT.n_sink,
                              gpu_k=gk[: work.n_host - split], gpu_v=gv[: work.n_host - split])

        t = safe(r, "recall", f"selected with GPU tier ({what})", lambda: graph_ms(tiered))
        if t is not None:
            key = "selected_gpu_tier_all" if split == 1 else "selected_gpu_tier_half"
            out[key + "_gbps"] = gbps(sel_bytes, t)
            r.row("recall", f"selected (runtime path), graph b=8 all missing, {what}", out[key + "_gbps"], "GB/s",
                  ratio_note(out[key + "_gbps"], h2d, "H2D"))
