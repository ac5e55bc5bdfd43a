"""Benchmark variants of the FreeKV runtime, named ``BASE[@N][+W][^1][:A]``: each suffix sets one of the
server's ``FREEKV_*`` variables (``freekv_sglang/settings.py``, docs/TUNING.md) for that variant's run.

``@N``: persistent grid of ``N`` programs for the selected-page recall (``FREEKV_RECALL_PROGRAMS``);
``+W``: ``W`` warps per recall program, one of 1, 2, 4, 8, 16 (``FREEKV_RECALL_WARPS``);
``^1``: prefill layers are offloaded on a side stream (``FREEKV_ASYNC_PREFILL``);
``:A``: the working-set attention kernel, ``auto`` (the default), ``triton`` or ``flashinfer``
(``FREEKV_DECODE_ATTENTION``);
``%L``: the synthetic query locality of this variant, overriding the benchmark's: ``%cal`` the calibrated one
(``FREEKV_BENCH_LOCALITY=calibrated``), ``%C`` a fixed consecutive cosine ``C`` (``FREEKV_BENCH_QUERY_COSINE``,
e.g. the optimistic ``%0.95``), ``%none`` the model's own queries.
E.g. ``freekv@32``, ``freekv@16+2``, ``freekv:flashinfer`` or ``freekv%0.95``. A base ``freekv-keepM`` is ``freekv`` with
``--freekv-keep-margin M``, ``freekv-overN`` with ``--freekv-overfetch-tokens N`` (speculative over-fetch of ``N``
tokens of pages), ``freekv-grid2`` with ``--freekv-page-scoring grid2``, and any of them together, e.g.
``freekv-keepM-overN``, ``freekv-grid2-keep4-tau80`` (correction threshold 0.80; :func:`base_options`).
"""

from __future__ import annotations

import os
import re

from freekv_sglang.settings import env_name, load_settings

VARIANT_ENV = {"@": env_name("recall_programs"), "+": env_name("recall_warps"), "^": env_name("async_prefill"),
               ":": env_name("decode_attention")}
LOCALITY_SEP = "%"
LOCALITY_ENV = (env_name("bench_query_cosine"), env_name("bench_locality"))
_NAME = re.compile(r"^([A-Za-z][\w-]*)((?:[@+^:%][^@+^:%]*)*)$")


#: Base-name suffixes of ``freekv``: the config field, the server flag and the flag's value from the number.
BASE_OPTIONS = {"keep": ("keep_margin", "--freekv-keep-margin", int),
                "over": ("overfetch_tokens", "--freekv-overfetch-tokens", int),
                "grid": ("page_scoring", "--freekv-page-scoring", lambda bits: f"grid{bits}"),
                "tau": ("correction_threshold", "--freekv-correction-threshold", lambda pct: pct / 100)}


def base_options(base: str) -> tuple[str, dict]:
    """``"freekv-keep4-over512"`` -> ``("freekv", {"keep_margin": 4, "overfetch_tokens": 512})``: the suffixes
    ``-keepM`` (``--freekv-keep-margin M``), ``-overN`` (``--freekv-overfetch-tokens N``), ``-grid2``
    (``--freekv-page-scoring grid2``) and ``-tauNN`` (``--freekv-correction-threshold NN/100``) of ``freekv``, each
    at most once, in any order; any other base -> ``(base, {})``."""
    m = re.fullmatch(r"freekv((?:-(?:keep|over|grid|tau)\d+)+)", base)
    if m is None:
        return base, {}
    opts: dict = {}
    for word, val in re.findall(r"-(keep|over|grid|tau)(\d+)", m.group(1)):
        field, _, value = BASE_OPTIONS[word]
        if field in opts:
            return base, {}  # a suffix twice: not a known base
        opts[field] = value(int(val))
    return "freekv", opts


def base_flags(opts: dict[str, int]) -> list[str]:
    """The server flags of :func:`base_options`' options."""
    flag = {field: f for field, f, _ in BASE_OPTIONS.values()}
    return [x for field, v in opts.items() for x in (flag[field], str(v))]


def keep_margin_of(base: str) -> tuple[str, int]:
    """``"freekv-keep4"`` -> ``("freekv", 4)`` (residency hysteresis, ``--freekv-keep-margin 4``); any
    other base -> ``(base, 0)`` (over-fetch suffixes: :func:`base_options`)."""
    plain, opts = base_options(base)
    return (plain, opts["keep_margin"]) if set(opts) == {"keep_margin"} else (base, 0)


def parse_variant(name: str) -> tuple[str, dict[str, str]]:
    """``"freekv@32+2"`` -> ``("freekv", {"FREEKV_RECALL_PROGRAMS": "32", "FREEKV_RECALL_WARPS": "2"})``.

    Raises ``ValueError`` with the reason for a malformed name or value (values are checked as the server
    will read them, :func:`freekv_sglang.settings.load_settings`).
    """
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"{name!r}: expected BASE[@programs][+warps][^1][:attention][%locality]")
    base, rest = m.group(1), m.group(2)
    env: dict[str, str] = {}
    for sep, val in re.findall(r"([@+^:%])([^@+^:%]*)", rest):
        if not val:
            raise ValueError(f"{name!r}: a value must follow {sep!r}")
        if sep == LOCALITY_SEP:
            if LOCALITY_ENV[0] in env:
                raise ValueError(f"{name!r}: {sep!r} given twice")
            env.update(locality_env(name, val))
            continue
        var = VARIANT_ENV[sep]
        if var in env:
            raise ValueError(f"{name!r}: {sep!r} given twice")
        if sep == "^" and val != "1":
            raise ValueError(f"{name!r}: '^' takes 1 (asynchronous prefill offload; off is the default)")
        env[var] = val
    try:
        load_settings(env)  # (an empty value reads as unset)
    except ValueError as e:
        raise ValueError(f"{name!r}: {e}") from None
    return base, env


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def page_scoring_of(base: str) -> str:
    """The page scoring a mode's base name serves with: ``freekv-grid2-keep4`` -> ``grid2``; else ``quest``."""
    return base_options(base)[1].get("page_scoring", "quest")


def locality_spec(spec: str, scoring: str = "quest") -> str:
    """A benchmark's ``--locality``: ``calibrated`` (the measurement of ``scoring``'s selection kept in this
    repository, ``freekv_sglang.runtime.synthetic.DEFAULT_LOCALITIES``) or ``calibrated:PATH`` -> ``calibrated:ABSOLUTE_PATH``, the value of
    ``FREEKV_BENCH_LOCALITY`` its servers get (whatever their working directory). ``ValueError`` if malformed or
    the file is missing."""
    if spec != "calibrated" and not spec.startswith("calibrated:"):
        raise ValueError(f"expected calibrated or calibrated:PATH, got {spec!r}")
    from freekv_sglang.runtime.synthetic import DEFAULT_LOCALITIES

    if spec == "calibrated" and scoring not in DEFAULT_LOCALITIES:
        raise ValueError(f"no calibrated locality for page scoring {scoring!r}")
    path = (os.path.join(_ROOT, DEFAULT_LOCALITIES[scoring]) if spec == "calibrated"
            else os.path.abspath(spec.split(":", 1)[1]))
    if not os.path.isfile(path):
        raise ValueError(f"no locality measurement at {path} (python -m freekv_sglang.fidelity.locality --json PATH "
                         "writes one)")
    return "calibrated:" + path


def locality_env(name: str, val: str) -> dict[str, str]:
    """The variables of a ``%L`` suffix (both locality variables: the one not used is set empty, i.e. unset)."""
    cos, loc = LOCALITY_ENV
    if val in ("cal", "calibrated"):
        return {cos: "", loc: "calibrated"}
    if val == "none":
        return {cos: "", loc: ""}
    try:
        float(val)
    except ValueError:
        raise ValueError(f"{name!r}: '%' takes cal, none or a cosine in (0, 1], got {val!r}") from None
    return {cos: val, loc: ""}


def apply_variant_env(env: dict[str, str], target: dict | None = None) -> dict:
    """Set the variant's variables in ``target`` (default ``os.environ``) and clear the other variant variables.
    The locality variables are left as they are unless the variant names a locality (``%L``); an empty value
    clears one."""
    target = os.environ if target is None else target
    for var in VARIANT_ENV.values():
        if var in env:
            target[var] = env[var]
        else:
            target.pop(var, None)
    for var in LOCALITY_ENV:
        if var in env:
            if env[var]:
                target[var] = env[var]
            else:
                target.pop(var, None)
    return target

