"""Benchmark variants of the FreeKV runtime, named ``BASE[@N][+W][^1][:A]``: each suffix sets one of the
server's ``FREEKV_*`` variables (``freekv_sglang/settings.py``, docs/TUNING.md) for that variant's run.

``@N``: persistent grid of ``N`` programs for the selected-page recall (``FREEKV_RECALL_PROGRAMS``);
``+W``: ``W`` warps per recall program, one of 1, 2, 4, 8, 16 (``FREEKV_RECALL_WARPS``);
``^1``: prefill layers are offloaded on a side stream (``FREEKV_ASYNC_PREFILL``);
``:A``: the working-set attention kernel, ``auto`` (the default), ``triton`` or ``flashinfer``
(``FREEKV_DECODE_ATTENTION``).
E.g. ``freekv@32``, ``freekv@16+2`` or ``freekv:flashinfer``. A base ``freekv-keepM`` is ``freekv`` with
``--freekv-keep-margin M``.
"""

from __future__ import annotations

import os
import re

from freekv_sglang.settings import env_name, load_settings

VARIANT_ENV = {"@": env_name("recall_programs"), "+": env_name("recall_warps"), "^": env_name("async_prefill"),
               ":": env_name("decode_attention")}
_NAME = re.compile(r"^([A-Za-z][\w-]*)((?:[@+^:][^@+^:]*)*)$")


def keep_margin_of(base: str) -> tuple[str, int]:
    """``"freekv-keep4"`` -> ``("freekv", 4)`` (residency hysteresis, ``--freekv-keep-margin 4``); any
    other base -> ``(base, 0)``."""
    m = re.fullmatch(r"freekv-keep(\d+)", base)
    return ("freekv", int(m.group(1))) if m else (base, 0)


def parse_variant(name: str) -> tuple[str, dict[str, str]]:
    """``"freekv@32+2"`` -> ``("freekv", {"FREEKV_RECALL_PROGRAMS": "32", "FREEKV_RECALL_WARPS": "2"})``.

    Raises ``ValueError`` with the reason for a malformed name or value (values are checked as the server
    will read them, :func:`freekv_sglang.settings.load_settings`).
    """
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"{name!r}: expected BASE[@programs][+warps][^1][:attention]")
    base, rest = m.group(1), m.group(2)
    env: dict[str, str] = {}
    for sep, val in re.findall(r"([@+^:])([^@+^:]*)", rest):
        var = VARIANT_ENV[sep]
        if var in env:
            raise ValueError(f"{name!r}: {sep!r} given twice")
        if not val:
            raise ValueError(f"{name!r}: a value must follow {sep!r}")
        if sep == "^" and val != "1":
            raise ValueError(f"{name!r}: '^' takes 1 (asynchronous prefill offload; off is the default)")
        env[var] = val
    try:
        load_settings(env)
    except ValueError as e:
        raise ValueError(f"{name!r}: {e}") from None
    return base, env


def apply_variant_env(env: dict[str, str], target: dict | None = None) -> dict:
    """Set the variant's variables in ``target`` (default ``os.environ``) and clear the other variant variables."""
    target = os.environ if target is None else target
    for var in VARIANT_ENV.values():
        if var in env:
            target[var] = env[var]
        else:
            target.pop(var, None)
    return target

