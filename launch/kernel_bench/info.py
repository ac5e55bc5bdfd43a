"""Sections ``info`` (device and software versions) and ``ceilings`` (pinned PCIe copies, HBM copy)."""

from __future__ import annotations

import torch

from .common import DEV, MIB, recall_mod
from .timing import Runner, bench_ms, gbps


def sec_info(r: Runner, out: dict):
    import triton
    try:
        import flashinfer
        fi = getattr(flashinfer, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        fi = f"unavailable ({type(e).__name__})"
    props = torch.cuda.get_device_properties(DEV)
    out.update(device=torch.cuda.get_device_name(), sm_count=props.multi_processor_count,
               memory_gib=round(props.total_memory / 2**30, 1), l2_mib=round(getattr(props, "L2_cache_size", 0) / MIB, 1),
               torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__, flashinfer=fi,
               gather_default_programs=recall_mod.DEFAULT_NUM_PROGRAMS)
    for k, v in out.items():
        r.row("info", k, v)


def pinned_copy_gbps(n: int = 256 * MIB) -> tuple[float, float]:
    """``(host-to-device, device-to-host)`` GB/s of ``n``-byte copies between pinned host memory and
    the GPU: the PCIe ceilings (also measured by ``bench_decode.py`` before its modes)."""
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    host.fill_(7)
    dev = torch.empty(n, dtype=torch.uint8, device=DEV)
    return (gbps(n, bench_ms(lambda: dev.copy_(host, non_blocking=True))),
            gbps(n, bench_ms(lambda: host.copy_(dev, non_blocking=True))))


def sec_ceilings(r: Runner, out: dict):
    n = 256 * MIB
    out["h2d_gbps"], out["d2h_gbps"] = pinned_copy_gbps(n)
    a = torch.empty(4 * n, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    out["hbm_copy_gbps"] = gbps(2 * a.numel(), bench_ms(lambda: b.copy_(a)))  # read + write bytes
    r.row("ceiling", "pinned H2D copy 256 MiB", out["h2d_gbps"], "GB/s")
    r.row("ceiling", "pinned D2H copy 256 MiB", out["d2h_gbps"], "GB/s")
    r.row("ceiling", "HBM device copy 1 GiB (read+write bytes)", out["hbm_copy_gbps"], "GB/s")
    r.state.update(out)
