"""The ``FREEKV_*`` environment variables: each declared once here, read once into a frozen object.

:func:`load_settings` reads them (at start-up of a scheduler process, a launcher or a benchmark) into an
:class:`EnvSettings`, which the runtime passes down to what needs a value; no other package module reads
the environment (the config hand-off ``SGLANG_FREEKV_CONFIG`` of :mod:`freekv_sglang.config` aside).
Unset or empty means the default. ``docs/TUNING.md`` is rendered from this module:
``python -m freekv_sglang.settings > docs/TUNING.md``.

Standard library only: the launcher's validation (:mod:`freekv_sglang.config`) reads it without torch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Mapping, Optional

logger = logging.getLogger(__name__)

ON_OFF = ("0", "1")


def _knob(env: str, default: Any, meaning: str, *, kind: type, choices: tuple = (),
          valid: Optional[Callable[[Any], bool]] = None, allowed: str = "", shown: str = "") -> Any:
    """A field of :class:`EnvSettings` read from ``env``: parsed as ``kind`` (``bool``: ``0`` or ``1``), one of
    ``choices`` or passing ``valid`` (described by ``allowed``); ``shown``: the default as the docs give it."""
    if not shown:
        shown = f"`{int(default)}`" if kind is bool else "unset" if default is None else f"`{default}`"
    meta = dict(env=env, kind=kind, choices=choices, valid=valid, meaning=meaning, shown=shown,
                allowed=allowed or ", ".join(f"`{c}`" for c in (ON_OFF if kind is bool else choices)))
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class EnvSettings:
    """Values of the ``FREEKV_*`` variables (construct directly, or with :func:`load_settings`)."""

    log_stats_every: int = _knob(
        "FREEKV_LOG_STATS_EVERY", 2000, "decode steps between log lines with the correction rate and the recall "
        "volume (0: never)", kind=int, valid=lambda v: v >= 0, allowed="an integer >= 0")
    recall_programs: Optional[int] = _knob(
        "FREEKV_RECALL_PROGRAMS", None, "persistent grid of the selected-page recall kernel (a program holds its SM "
        "for the whole transfer, and 8 programs already saturate the host link)", kind=int, valid=lambda v: v >= 1,
        allowed="an integer >= 1", shown="32 (at most one per SM)")
    recall_warps: int = _knob(
        "FREEKV_RECALL_WARPS", 8, "warps per program of the selected-page recall kernel", kind=int,
        choices=(1, 2, 4, 8, 16))
    decode_attention: str = _knob(
        "FREEKV_DECODE_ATTENTION", "auto", "working-set attention kernel: `triton` the Triton split decode "
        "(`kernels/split_decode.py`, no host plan), `flashinfer` FlashInfer's paged decode (planned on the host each "
        "step), `auto` `triton` where its tiles fit (page size >= 16, power-of-two head dim >= 16, bf16/fp16), else "
        "`flashinfer`", kind=str, choices=("auto", "triton", "flashinfer"))
    async_prefill: bool = _knob(
        "FREEKV_ASYNC_PREFILL", False, "`1`: each prefill layer's offload to the host tier (and its digests and first "
        "working set) runs on a side stream while the next layers compute", kind=bool)
    host_alloc: str = _knob(
        "FREEKV_HOST_ALLOC", "parallel", "how the host tier is page-locked: `parallel` an anonymous mapping faulted "
        "in by many threads, then `cudaHostRegister` (falls back to `sglang` if that fails); `sglang` SGLang's "
        "host-pool allocator (one thread populates it: about 30x slower); the time is logged", kind=str,
        choices=("parallel", "sglang"))
    host_memory_check: bool = _knob(
        "FREEKV_HOST_MEMORY_CHECK", True, "`0`: accept a `--freekv-host-memory-gb` larger than MemTotal (virtual "
        "machines whose MemTotal grows as memory is touched); pinning more than the machine holds then fails at "
        "start-up", kind=bool)
    overlap_schedule: bool = _knob(
        "FREEKV_EXPERIMENTAL_OVERLAP_SCHEDULE", False, "`1`: leave SGLang's overlap scheduler on, its writes of "
        "`req_to_token` fenced behind whole forwards (docs/DESIGN.md, \"Under the overlap scheduler\"); off by "
        "default until `tests/gpu/test_server_overlap.py` has passed on a GPU and its speed is timed", kind=bool)
    bench_query_cosine: Optional[float] = _knob(
        "FREEKV_BENCH_QUERY_COSINE", None, "benchmarks only: decode queries are replaced by synthetic ones with this "
        "consecutive cosine (`runtime/synthetic.py`); generated tokens become meaningless", kind=float,
        valid=lambda v: 0.0 < v <= 1.0, allowed="a number in (0, 1]")
    bench_locality: Optional[str] = _knob(
        "FREEKV_BENCH_LOCALITY", None, "benchmarks only: decode queries are replaced by synthetic ones at a measured "
        "query locality (`runtime/synthetic.py`): per (layer, KV head) the correction check's similarity is drawn "
        "from the measurement and the share of selected pages that change per step matches it; `calibrated` is "
        "`docs/data/locality-smollm2-135m.json` (SmolLM2-135M, `python -m freekv_sglang.fidelity.locality`), "
        "`-grid2.json` with `--freekv-page-scoring grid2` (its own selection's page change); "
        "generated tokens become meaningless; not with `FREEKV_BENCH_QUERY_COSINE`", kind=str,
        allowed="`calibrated`, `calibrated:PATH` or the path of such a JSON")
    model_cache: str = _knob(
        "FREEKV_MODEL_CACHE", "~/.cache/freekv_sglang/smollm2-135m-instruct", "folder of the converted default model "
        "(`python -m freekv_sglang.serve`)", kind=str, allowed="a path")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, m = getattr(self, f.name), f.metadata
            if not (value is None and f.default is None) and not _allowed(m, value):
                raise _refused(m, value)
        if self.bench_query_cosine is not None and self.bench_locality is not None:
            raise ValueError("FREEKV_BENCH_QUERY_COSINE and FREEKV_BENCH_LOCALITY are two synthetic localities: set one")


def _refused(m: Mapping[str, Any], value: Any) -> ValueError:
    one_of = "one of " if m["choices"] or m["kind"] is bool else ""
    return ValueError(f"{m['env']} must be {one_of}{m['allowed'].replace('`', '')}, got {value!r}")


def _allowed(m: Mapping[str, Any], value: Any) -> bool:
    kinds = (int, float) if m["kind"] is float else m["kind"]
    if not isinstance(value, kinds) or (isinstance(value, bool) and m["kind"] is not bool):
        return False
    return (not m["choices"] or value in m["choices"]) and (m["valid"] is None or m["valid"](value))


#: Variables of earlier versions, with why they went (set, they are ignored with a warning).
REMOVED = {
    "FREEKV_SPEC_STREAMS": "speculation always runs selection and recall on two side streams (measured 1.00-1.18x "
                           "faster than one)",
    "FREEKV_DEFER_LAYERS": "deferring the last layers' speculation to the next step measured 1.03-1.06x slower",
    "FREEKV_DECODE_SPLIT_PAGES": "no fixed KV split beat FlashInfer's own choice, and the Triton split decode is "
                                 "the default attention",
    "FREEKV_SCORE_BLOCK": "the scoring launch shape is chosen per call; an explicit block timed the same end to end",
    "FREEKV_SCORE_WARPS": "as FREEKV_SCORE_BLOCK",
    "FREEKV_UVA_WRAP": "a fallback for a Triton that would refuse pinned CPU tensors; no supported Triton needs it",
}


def env_name(field: str) -> str:
    """The variable behind an :class:`EnvSettings` field (``"host_memory_check"`` -> ``FREEKV_HOST_MEMORY_CHECK``)."""
    return EnvSettings.__dataclass_fields__[field].metadata["env"]


def _parse(f: dataclasses.Field, raw: str) -> Any:
    m = f.metadata
    try:
        if m["kind"] is bool:
            if raw not in ON_OFF:
                raise ValueError
            return raw == "1"
        return m["kind"](raw)
    except ValueError:
        raise _refused(m, raw) from None


def load_settings(environ: Mapping[str, str] = os.environ) -> EnvSettings:
    """Read every ``FREEKV_*`` variable of ``environ`` (unset or empty: the default); a bad value raises
    ``ValueError`` naming the variable. Variables of :data:`REMOVED` are ignored with a warning."""
    values = {}
    for f in dataclasses.fields(EnvSettings):
        raw = environ.get(f.metadata["env"], "").strip()
        if raw:
            values[f.name] = _parse(f, raw)
    for name, why in REMOVED.items():
        if environ.get(name, "").strip():
            logger.warning("%s is no longer read and has no effect: %s", name, why)
    return EnvSettings(**values)


def child_environ(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment with ``extra`` set, for a child process (e.g. a server with its variables)."""
    return {**os.environ, **extra}


def render_tuning_md() -> str:
    """``docs/TUNING.md``: the table of the variables and of the removed ones."""
    out = ["# Tuning and benchmarking variables", "",
           "Environment variables read once at start-up by the FreeKV plugin and runtime (in SGLang's launcher and "
           "scheduler processes). Defaults are what `docs/BENCHMARKS.md` measured; unset or empty means the default. "
           "Generated from `freekv_sglang/settings.py` (`python -m freekv_sglang.settings > docs/TUNING.md`; a test "
           "compares). `launch/bench_decode.py` and `launch/profile_decode_step.py` set several of them per mode "
           "through variant names (`freekv@64+2`: 64 recall programs of 2 warps; see `launch/bench_variants.py`).", "",
           "| variable | values | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(EnvSettings):
        m = f.metadata
        out.append(f"| `{m['env']}` | {m['allowed']} | {m['shown']} | {m['meaning']} |")
    out += ["", "No longer read (ignored with a warning when set):", "", "| variable | why |", "|---|---|"]
    out += [f"| `{name}` | {why} |" for name, why in REMOVED.items()]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render_tuning_md(), end="")
