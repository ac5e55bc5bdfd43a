"""Benchmark variants of the FreeKV runtime, named ``BASE[@N][+W][/S][%M][^1][~K]``.

``@N``: persistent grid of ``N`` programs for the selected-page recall (``FREEKV_RECALL_PROGRAMS``);
``+W``: ``W`` warps per recall program, one of 1, 2, 4, 8, 16 (``FREEKV_RECALL_WARPS``);
``/S``: ``S`` side streams for speculation, 1 or 2 (``FREEKV_SPEC_STREAMS``);
``%M``: the last ``M`` layers speculate at the next step's start (``FREEKV_DEFER_LAYERS``);
``^1``: prefill layers are offloaded on a side stream (``FREEKV_ASYNC_PREFILL``);
``~K``: fixed KV split of ``K`` pages in FlashInfer's working-set attention of eager steps
(``FREEKV_DECODE_SPLIT_PAGES``, with ``:flashinfer``; CUDA-graph steps keep FlashInfer's split, which a fixed one of
a larger batch would overflow);
``#B``: ``B`` pages per scoring program (``FREEKV_SCORE_BLOCK``);
``:A``: the working-set attention kernel, ``auto`` (the default), ``flashinfer``, ``xqa`` or ``triton``
(``FREEKV_DECODE_ATTENTION``).
E.g. ``freekv@32/1``, ``freekv:flashinfer~8``, ``freekv@16+2`` or ``freekv%16``. The launch scripts set these variables for the variant's run only.
"""

from __future__ import annotations

import os
import re

VARIANT_ENV = {"@": "FREEKV_RECALL_PROGRAMS", "+": "FREEKV_RECALL_WARPS", "/": "FREEKV_SPEC_STREAMS",
               "%": "FREEKV_DEFER_LAYERS", "^": "FREEKV_ASYNC_PREFILL", "~": "FREEKV_DECODE_SPLIT_PAGES",
               "#": "FREEKV_SCORE_BLOCK", ":": "FREEKV_DECODE_ATTENTION"}
_NAME = re.compile(r"^([A-Za-z][\w-]*)((?:[@+/%^~#:][^@+/%^~#:]*)*)$")


def keep_margin_of(base: str) -> tuple[str, int]:
    """``"freekv-keep4"`` -> ``("freekv", 4)`` (residency hysteresis, ``--freekv-keep-margin 4``); any
    other base -> ``(base, 0)``."""
    m = re.fullmatch(r"freekv-keep(\d+)", base)
    return ("freekv", int(m.group(1))) if m else (base, 0)


def parse_variant(name: str) -> tuple[str, dict[str, str]]:
    """``"freekv@32/1"`` -> ``("freekv", {"FREEKV_RECALL_PROGRAMS": "32", "FREEKV_SPEC_STREAMS": "1"})``;
    ``"freekv#64:xqa"`` -> 64 pages per scoring program, XQA working-set attention.

    Raises ``ValueError`` with the reason for a malformed name or value.
    """
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"{name!r}: expected BASE[@programs][+warps][/streams][%deferred_layers][^1][~split_pages]"
                         "[#score_block][:attention]")
    base, rest = m.group(1), m.group(2)
    env: dict[str, str] = {}
    for sep, val in re.findall(r"([@+/%^~#:])([^@+/%^~#:]*)", rest):
        var = VARIANT_ENV[sep]
        if var in env:
            raise ValueError(f"{name!r}: {sep!r} given twice")
        if sep == ":":
            if val not in ("auto", "flashinfer", "xqa", "triton"):
                raise ValueError(f"{name!r}: the attention kernel after ':' must be auto, flashinfer, xqa or triton")
            env[var] = val
            continue
        if not val.isdigit() or int(val) < 1:
            raise ValueError(f"{name!r}: the value after {sep!r} must be a positive integer")
        if sep == "/" and val not in ("1", "2"):
            raise ValueError(f"{name!r}: the stream count after '/' must be 1 or 2")
        if sep == "^" and val != "1":
            raise ValueError(f"{name!r}: '^' takes 1 (asynchronous prefill offload; off is the default)")
        if sep == "+" and val not in ("1", "2", "4", "8", "16"):
            raise ValueError(f"{name!r}: the warp count after '+' must be 1, 2, 4, 8 or 16")
        if sep == "#" and int(val) & (int(val) - 1):
            raise ValueError(f"{name!r}: the pages per scoring program after '#' must be a power of two")
        env[var] = val
    if "~" in rest and env.get(VARIANT_ENV[":"]) != "flashinfer":
        raise ValueError(f"{name!r}: '~' splits FlashInfer's working-set attention; add ':flashinfer'")
    return base, env


def apply_variant_env(env: dict[str, str], target: dict | None = None) -> dict:
    """Set the variant's variables in ``target`` (default ``os.environ``) and clear the others."""
    target = os.environ if target is None else target
    for var in VARIANT_ENV.values():
        if var in env:
            target[var] = env[var]
        else:
            target.pop(var, None)
    return target
