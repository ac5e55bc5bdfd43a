"""FreeKV configuration: one validated, frozen dataclass shared by every process.

The same :class:`FreeKVConfig` is built from the command line (``--kv-retrieval``
and the ``--freekv-*`` flags, see :mod:`freekv_sglang.cli`), from keyword
arguments (:func:`freekv_sglang.make_server_args`) or from JSON (the copy that
travels to scheduler processes in the ``SGLANG_FREEKV_CONFIG`` environment
variable).  Construction validates every field; an invalid value raises
:class:`FreeKVConfigError` naming the CLI flag and the bad value.

This module depends on the standard library only, so the algorithm and runtime
packages can import it without SGLang.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import textwrap
from typing import Any, Mapping, Optional

from freekv_sglang.settings import env_name, load_settings

#: Smallest page for ``--freekv-page-scoring grid2`` (``kernels.grid_codes.GPU_MIN_PAGE``, repeated here so that the
#: configuration needs only the standard library; a test keeps the two equal).
GRID2_MIN_PAGE = 32

#: Environment variable carrying the JSON config into spawned scheduler processes.
ENV_VAR = "SGLANG_FREEKV_CONFIG"

KV_RETRIEVAL_CHOICES = ("none", "freekv")
GQA_AGGREGATION_CHOICES = ("mean", "softmax-mean", "max")
#: Host-to-GPU recall strategies (:mod:`freekv_sglang.runtime.recall`); ``auto`` resolves to :data:`AUTO_RECALL`.
RECALL_STRATEGIES = ("gather", "staged", "per-page", "skip")
RECALL_CHOICES = ("auto",) + RECALL_STRATEGIES
#: The strategies that copy the host tier's bytes as they are (the eager comparison baselines): they widen no
#: FP8 tier and read no GPU tier.
BYTE_COPY_RECALLS = ("staged", "per-page")
KV_STORAGE_CHOICES = ("auto", "fp8_e4m3")
#: Page-scoring rules of the runtime: ``quest`` (channel max/min digests) or ``grid2`` (every key in 2 bits per
#: channel on a grid fitted to the request's sink tokens; the ``grid2sink`` rule of the fidelity study).
PAGE_SCORING_CHOICES = ("quest", "grid2")
#: What ``--freekv-recall auto`` resolves to.
AUTO_RECALL = "gather"
#: Strings accepted by ``--freekv-correction-threshold`` to turn correction off.
CORRECTION_OFF_WORDS = ("off", "none")

MIN_PAGE_SIZE = 8
MAX_PAGE_SIZE = 256

#: ``0`` skips the check that ``--freekv-host-memory-gb`` fits in MemTotal (virtual machines whose
#: MemTotal grows as memory is touched report far less at start-up than they can hold).
RAM_CHECK_ENV = env_name("host_memory_check")
#: Auto host-memory sizing: this fraction of MemAvailable, minus the reserve.
AUTO_HOST_MEMORY_FRACTION = 0.6
AUTO_HOST_MEMORY_RESERVE_BYTES = 4 * 2**30

GIB = 2**30
MEMINFO_PATH = "/proc/meminfo"


class FreeKVConfigError(ValueError):
    """An invalid FreeKV setting or an unsupported combination with SGLang flags."""


def _setting(default: Any, flag: str, help: str, /, **options: Any) -> Any:
    """A :class:`FreeKVConfig` field described once: CLI ``flag``, ``help`` (of ``--help``, the docstring and
    docs/USAGE.md) and other ``add_argument`` options (``type``, ``metavar``, ``choices``, ``action``, a ``default``
    unlike the field's, ``aliases``: ``{flag: options}`` setting the same dest) for :mod:`freekv_sglang.cli`."""
    return dataclasses.field(default=default, metadata={"flag": flag, "help": help, "argparse": options})


def shown_default(field: dataclasses.Field) -> str:
    """How a setting's default reads in ``--help`` and the docs (``on``, ``auto`` for ``None``, ``0.9``)."""
    value = field.metadata["argparse"].get("default", field.default)
    if isinstance(value, bool):
        return "on" if value else "off"
    return "auto" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _threshold_arg(text: str) -> Any:
    """Argparse type of ``--freekv-correction-threshold``: a float, or ``"off"``."""
    if text.strip().lower() in CORRECTION_OFF_WORDS:
        return "off"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [-1, 1] or 'off', got {text!r}") from None


def dest_of_field(name: str) -> str:
    """Argparse dest / keyword name of a config field (``page_size`` -> ``freekv_page_size``)."""
    return "kv_retrieval" if name == "enabled" else f"freekv_{name}"


def _fail(field: str, value: Any, why: str) -> FreeKVConfigError:
    return FreeKVConfigError(f"{FLAG_OF_FIELD[field]}={value!r}: {why}")


def read_meminfo(path: str = MEMINFO_PATH) -> dict[str, int]:
    """Return ``/proc/meminfo`` as ``{key: bytes}``; an empty dict if unreadable."""
    out: dict[str, int] = {}
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if not parts:
                    continue
                scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
                out[key.strip()] = int(parts[0]) * scale
    except (OSError, ValueError):
        return {}
    return out


def check_recall(recall: str, *, kv_fp8: bool = False, gpu_tier: Any = 0) -> None:
    """What a recall strategy can serve, checked here only (config validation and the runtime's build):
    :data:`BYTE_COPY_RECALLS` need bf16/fp16 tiers (``kv_fp8`` false) and no GPU tier (``gpu_tier``, its size
    as the message should show it, falsy for none)."""
    if recall not in BYTE_COPY_RECALLS:
        return
    if kv_fp8:
        raise _fail("kv_storage", "fp8_e4m3", f"FP8 tiers need --freekv-recall gather (got {recall})")
    if gpu_tier:
        raise _fail("gpu_tier_gb", gpu_tier, f"a GPU tier needs --freekv-recall gather (got {recall})")


def parse_correction_threshold(value: Any) -> Optional[float]:
    """Turn a CLI/kwarg correction threshold into a float, or ``None`` for off.

    Accepts numbers, numeric strings and the words in :data:`CORRECTION_OFF_WORDS`.
    Range checking is done by :class:`FreeKVConfig`.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() in CORRECTION_OFF_WORDS:
            return None
        try:
            return float(value)
        except ValueError:
            raise _fail(
                "correction_threshold", value, "expected a number in [-1, 1] or 'off'"
            ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail("correction_threshold", value, "expected a number in [-1, 1] or 'off'")
    return float(value)


def _parse_enabled(value: Any) -> bool:
    """``kv_retrieval`` is given as ``none``/``freekv``; booleans are accepted too."""
    if isinstance(value, bool):
        return value
    if value in KV_RETRIEVAL_CHOICES:
        return value == "freekv"
    raise _fail("enabled", value, f"expected one of {', '.join(KV_RETRIEVAL_CHOICES)}")


@dataclasses.dataclass(frozen=True)
class FreeKVConfig:
    """Effective FreeKV settings (token counts are per request and layer; each KV head selects its own pages
    within ``select_tokens``). ``enabled`` is ``--kv-retrieval freekv``; ``None`` means off for ``correction_threshold``
    and auto for ``host_memory_gb``. The list below is rendered from the fields' metadata (:func:`_setting`)."""

    enabled: bool = _setting(
        False, "--kv-retrieval", "KV retrieval method: 'freekv' turns FreeKV on; 'none' leaves SGLang unchanged.",
        choices=KV_RETRIEVAL_CHOICES, default="none")
    page_size: int = _setting(
        32, "--freekv-page-size", f"Tokens per KV page (a power of two, {MIN_PAGE_SIZE}-{MAX_PAGE_SIZE}); also "
        "becomes SGLang's --page-size.", type=int, metavar="TOKENS")
    sink_tokens: int = _setting(
        512, "--freekv-sink-tokens", "Leading (attention-sink) tokens always kept on the GPU; a multiple of the page "
        "size.", type=int, metavar="TOKENS")
    window_tokens: int = _setting(
        512, "--freekv-window-tokens", "Recent window kept on the GPU: a ring of full pages plus the page being "
        "filled; a multiple of the page size, at least 2 pages.", type=int, metavar="TOKENS")
    select_tokens: int = _setting(
        1024, "--freekv-select-tokens", "Budget of selected pages per KV head, in tokens; a multiple of the page "
        "size, at least 1 page.", type=int, metavar="TOKENS")
    correction_threshold: Optional[float] = _setting(
        0.9, "--freekv-correction-threshold", "Query cosine-similarity threshold in [-1, 1] below which a "
        "speculative selection is corrected (per KV head, before attention); 'off' disables correction.",
        type=_threshold_arg, metavar="COS|off", aliases={"--freekv-no-correction": dict(
            action="store_const", const="off", help="Same as --freekv-correction-threshold off.")})
    speculative: bool = _setting(
        True, "--freekv-speculative", "Speculative page selection: select pages for the next step with the "
        "current query, overlapping recall with compute.", action="store_true", aliases={
            "--freekv-no-speculative": dict(action="store_false", help="Turn speculative page selection off "
                                            "(select and recall synchronously).")})
    gqa_aggregation: str = _setting(
        "mean", "--freekv-gqa-aggregation", "How page scores of the query heads sharing a KV head are combined.",
        choices=GQA_AGGREGATION_CHOICES)
    host_memory_gb: Optional[float] = _setting(
        None, "--freekv-host-memory-gb", "Pinned host memory for the full KV cache of the whole server, in GiB "
        f"(2^30 bytes); auto = {AUTO_HOST_MEMORY_FRACTION:.0%} of the available RAM minus "
        f"{AUTO_HOST_MEMORY_RESERVE_BYTES // GIB} GiB. Must not exceed total RAM.", type=float, metavar="GIB")
    min_context_tokens: int = _setting(
        0, "--freekv-min-context-tokens", "Requests whose context is shorter run dense. Requests whose context "
        "fits sink + select + window are exact anyway; larger values are refused (not supported yet).",
        type=int, metavar="TOKENS")
    recall: str = _setting(
        "auto", "--freekv-recall", "Host-to-GPU recall: auto (= gather); gather = device-side gather kernel "
        "reading pinned host memory (CUDA-graph safe); staged = double-buffered async copies through two staging "
        "buffers; per-page = one synchronous copy per page (baseline); skip = no transfers, benchmark upper bound "
        "only, outputs are WRONG.", choices=RECALL_CHOICES)
    gpu_tier_gb: float = _setting(
        0.0, "--freekv-gpu-tier-gb", "GPU memory, in GiB, that holds more requests' full KV beside the host tier "
        "(filled once the host tier is full; recall from it stays on the GPU). Taken from SGLang's KV budget, so "
        "fewer working sets fit; needs the gather recall. 0 = none.", type=float, metavar="GIB")
    kv_storage: str = _setting(
        "auto", "--freekv-kv-storage", "dtype of the full KV cache in the host (and GPU) tier: auto = the model's "
        "KV dtype; fp8_e4m3 = FP8 (half the memory, so twice the tokens, and half the recall traffic; values "
        "saturate at +-448, and what attention sees is the rounded K/V).", choices=KV_STORAGE_CHOICES)
    keep_margin: int = _setting(
        0, "--freekv-keep-margin", "Residency hysteresis: a page already on the GPU stays selected while it ranks "
        "within the top (selected pages + PAGES) of its KV head, so fewer pages are recalled per step, at the "
        "price of attending such a page instead of one ranked just inside the budget; 0 = plain top-k.",
        type=int, metavar="PAGES")
    overfetch_tokens: int = _setting(
        0, "--freekv-overfetch-tokens", "Speculative over-fetch: speculation keeps this many tokens of pages beyond "
        "the select budget resident per KV head (its top select + TOKENS), so that a corrected head finds more of "
        "its new top pages on the GPU and recalls only those of its top-budget pages that are missing, keeping the "
        "best resident ones in the other slots; attention reads every resident page. Each working set grows by "
        "TOKENS per layer and KV head. A multiple of the page size; needs speculation; 0 = off.",
        type=int, metavar="TOKENS")
    page_scoring: str = _setting(
        "quest", "--freekv-page-scoring", "How candidate pages are scored: quest = per page and KV head the channel "
        "max/min of its keys; grid2 = every key of the page in 2 bits per channel on a grid fitted to the request's "
        "sink tokens, scored by its attention mass (better retrieval, twice Quest's digest memory at head dim 128 "
        "and page 32, selection 1.8x Quest's time at 32K x 8 on an H100; with --freekv-keep-margin 4 it recalls as "
        "many pages as Quest on SmolLM2). grid2 needs sink tokens, a power-of-two head dim >= 64, pages of >= 32 "
        "tokens and no over-fetch.", choices=PAGE_SCORING_CHOICES)

    def __post_init__(self) -> None:
        self._validate()

    # ------------------------------------------------------------------ checks
    def _validate(self) -> None:
        if not isinstance(self.enabled, bool):
            raise _fail("enabled", self.enabled, "expected a boolean")
        for name in ("page_size", "sink_tokens", "window_tokens", "select_tokens",
                     "min_context_tokens", "keep_margin", "overfetch_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise _fail(name, value, "expected an integer")

        ps = self.page_size
        if ps < MIN_PAGE_SIZE or ps > MAX_PAGE_SIZE or ps & (ps - 1):
            raise _fail(
                "page_size", ps,
                f"must be a power of two between {MIN_PAGE_SIZE} and {MAX_PAGE_SIZE}",
            )
        if self.sink_tokens < 0:
            raise _fail("sink_tokens", self.sink_tokens, "must be >= 0")
        for name in ("sink_tokens", "window_tokens", "select_tokens"):
            value = getattr(self, name)
            if value % ps:
                raise _fail(name, value, f"must be a multiple of the page size ({ps})")
        if self.window_tokens < 2 * ps:
            raise _fail(
                "window_tokens", self.window_tokens,
                f"must be at least 2 pages ({2 * ps} tokens at page size {ps})",
            )
        if self.select_tokens < ps:
            raise _fail(
                "select_tokens", self.select_tokens,
                f"must be at least 1 page ({ps} tokens)",
            )
        if self.min_context_tokens < 0:
            raise _fail("min_context_tokens", self.min_context_tokens, "must be >= 0")
        if self.overfetch_tokens < 0 or self.overfetch_tokens % ps:
            raise _fail("overfetch_tokens", self.overfetch_tokens,
                        f"must be >= 0 and a multiple of the page size ({ps})")
        if self.overfetch_tokens and not self.speculative:
            raise _fail("overfetch_tokens", self.overfetch_tokens,
                        "over-fetch is speculation's: it needs --freekv-speculative (drop --freekv-no-speculative)")
        if not 0 <= self.keep_margin <= self.select_tokens // ps:
            raise _fail("keep_margin", self.keep_margin,
                        f"must be between 0 and the selected pages per KV head ({self.select_tokens // ps})")
        ws_tokens = self.sink_tokens + self.select_tokens + self.overfetch_tokens + self.window_tokens
        if self.min_context_tokens > ws_tokens:
            # requests whose context fits the working set already attend densely; a dense path
            # for longer contexts (full KV on the GPU) is not implemented
            raise _fail("min_context_tokens", self.min_context_tokens,
                        f"values above the working set ({ws_tokens} tokens = sink + select + over-fetch + window) are "
                        "not supported yet: requests up to the working set already run dense")

        ct = self.correction_threshold
        if ct is not None:
            if isinstance(ct, bool) or not isinstance(ct, (int, float)):
                raise _fail("correction_threshold", ct, "expected a number or None")
            if not (-1.0 <= ct <= 1.0) or math.isnan(ct):
                raise _fail("correction_threshold", ct, "must be within [-1, 1] (or 'off')")

        if not isinstance(self.speculative, bool):
            raise _fail("speculative", self.speculative, "expected a boolean")
        if self.gqa_aggregation not in GQA_AGGREGATION_CHOICES:
            raise _fail(
                "gqa_aggregation", self.gqa_aggregation,
                f"expected one of {', '.join(GQA_AGGREGATION_CHOICES)}",
            )
        if self.recall not in RECALL_CHOICES:
            raise _fail("recall", self.recall, f"expected one of {', '.join(RECALL_CHOICES)}")
        if self.page_scoring not in PAGE_SCORING_CHOICES:
            raise _fail("page_scoring", self.page_scoring, f"expected one of {', '.join(PAGE_SCORING_CHOICES)}")
        if self.page_scoring == "grid2":
            if self.sink_tokens == 0:
                raise _fail("page_scoring", "grid2", "grid2 fits its grid on the sink tokens: needs "
                            "--freekv-sink-tokens > 0")
            if self.page_size < GRID2_MIN_PAGE:
                raise NotImplementedError(f"--freekv-page-scoring grid2 with pages of {self.page_size} tokens is not "
                                          f"supported on the GPU yet (its kernel checks fail below {GRID2_MIN_PAGE}-"
                                          f"token pages): use --freekv-page-size {GRID2_MIN_PAGE} or more")
            if self.overfetch_tokens:
                raise NotImplementedError("--freekv-page-scoring grid2 with --freekv-overfetch-tokens is not "
                                          "implemented (the fused over-fetch correction is untested with grid codes)")

        if self.kv_storage not in KV_STORAGE_CHOICES:
            raise _fail("kv_storage", self.kv_storage, f"expected one of {', '.join(KV_STORAGE_CHOICES)}")
        gt = self.gpu_tier_gb
        if isinstance(gt, bool) or not isinstance(gt, (int, float)) or math.isnan(gt) or math.isinf(gt):
            raise _fail("gpu_tier_gb", gt, "expected a number of GiB")
        if gt < 0:
            raise _fail("gpu_tier_gb", gt, "must be >= 0")
        check_recall(self.recall, kv_fp8=self.kv_storage == "fp8_e4m3", gpu_tier=gt)

        hm = self.host_memory_gb
        if hm is not None:
            if isinstance(hm, bool) or not isinstance(hm, (int, float)) or math.isnan(hm):
                raise _fail("host_memory_gb", hm, "expected a number of GiB")
            if hm <= 0:
                raise _fail("host_memory_gb", hm, "must be > 0")
            total = read_meminfo().get("MemTotal")
            if total is not None and hm * GIB > total and load_settings().host_memory_check:
                raise _fail(
                    "host_memory_gb", hm,
                    f"exceeds this machine's total RAM ({total / GIB:.1f} GiB); on a virtual machine whose "
                    f"MemTotal grows as memory is used, {RAM_CHECK_ENV}=0 skips this check",
                )

    # ------------------------------------------------------- derived, read-only
    @property
    def n_sink_pages(self) -> int:
        return self.sink_tokens // self.page_size

    @property
    def n_select_pages(self) -> int:
        return self.select_tokens // self.page_size

    @property
    def n_window_pages(self) -> int:
        return self.window_tokens // self.page_size

    @property
    def n_overfetch_pages(self) -> int:
        return self.overfetch_tokens // self.page_size

    @property
    def pages_per_request(self) -> int:
        """GPU working-set page slots per (request, layer): sink + selected (budget + over-fetch) + window."""
        return self.n_sink_pages + self.n_select_pages + self.n_overfetch_pages + self.n_window_pages

    @property
    def working_set_tokens(self) -> int:
        return self.pages_per_request * self.page_size

    @property
    def effective_recall(self) -> str:
        """The recall strategy actually used (``auto`` resolved)."""
        return AUTO_RECALL if self.recall == "auto" else self.recall

    @property
    def correction_enabled(self) -> bool:
        return self.correction_threshold is not None

    def warnings(self) -> list[str]:
        """Settings that are valid but deserve a loud warning at start-up."""
        out = []
        if self.enabled and self.recall == "skip":
            out.append(
                "--freekv-recall skip: NO host-to-GPU transfers are made; generated "
                "outputs are WRONG. Use only as a benchmark upper bound."
            )
        return out

    # --------------------------------------------------------------- builders
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "FreeKVConfig":
        """Build from CLI dests / keyword names (``kv_retrieval``, ``freekv_page_size``...).

        Missing keys take their defaults; ``None`` for a key also means "default",
        except for the correction threshold (``None`` = off) and host memory
        (``None`` = auto). Unknown ``freekv_*`` keys are rejected.
        """
        known = {dest_of_field(f.name): f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise FreeKVConfigError(
                f"unknown FreeKV option(s): {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        kwargs: dict[str, Any] = {}
        for dest, value in values.items():
            name = known[dest]
            if name == "enabled":
                if value is not None:
                    kwargs[name] = _parse_enabled(value)
            elif name == "correction_threshold":
                kwargs[name] = parse_correction_threshold(value)
            elif name == "host_memory_gb":
                kwargs[name] = value
            elif value is not None:
                kwargs[name] = value
        return cls(**kwargs)

    @classmethod
    def from_namespace(cls, ns: Any) -> "FreeKVConfig":
        """Pop every FreeKV attribute off an argparse namespace and build the config.

        Attributes that are absent take their defaults, so a namespace from a
        parser without the FreeKV flags yields the default (disabled) config.
        """
        values = {}
        for f in dataclasses.fields(cls):
            dest = dest_of_field(f.name)
            if hasattr(ns, dest):
                values[dest] = getattr(ns, dest)
                delattr(ns, dest)
        return cls.from_mapping(values)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FreeKVConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise FreeKVConfigError(f"{ENV_VAR} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise FreeKVConfigError(f"{ENV_VAR} must hold a JSON object, got {data!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise FreeKVConfigError(f"{ENV_VAR} has unknown key(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> Optional["FreeKVConfig"]:
        """The config exported by the launcher, or ``None`` if the variable is unset."""
        raw = (os.environ if environ is None else environ).get(ENV_VAR)
        return None if not raw else cls.from_json(raw)

    def summary(self) -> str:
        """One line with every effective value, including the resolved host memory."""
        if not self.enabled:
            return "FreeKV disabled (--kv-retrieval none)"
        try:
            mem = f"{resolve_host_memory_bytes(self) / GIB:.1f}GiB"
        except FreeKVConfigError as e:
            mem = f"unresolvable ({e})"
        if self.host_memory_gb is None:
            mem += " (auto)"
        ct = "off" if self.correction_threshold is None else f"{self.correction_threshold:g}"
        recall = self.effective_recall + (" (auto)" if self.recall == "auto" else "")
        return (
            f"FreeKV enabled: page_size={self.page_size} sink={self.sink_tokens} "
            f"window={self.window_tokens} select={self.select_tokens} "
            f"pages_per_request={self.pages_per_request} "
            f"working_set_tokens={self.working_set_tokens} correction_threshold={ct} "
            f"speculative={'on' if self.speculative else 'off'} "
            f"gqa_aggregation={self.gqa_aggregation} recall={recall} "
            f"host_memory={mem} min_context_tokens={self.min_context_tokens}"
            + (f" gpu_tier={self.gpu_tier_gb:g}GiB" if self.gpu_tier_gb else "")
            + (f" kv_storage={self.kv_storage}" if self.kv_storage != "auto" else "")
            + (f" keep_margin={self.keep_margin}" if self.keep_margin else "")
            + (f" overfetch={self.overfetch_tokens}" if self.overfetch_tokens else "")
            + (f" page_scoring={self.page_scoring}" if self.page_scoring != "quest" else "")
        )


#: Field name -> CLI flag, used in error messages and by the CLI module.
FLAG_OF_FIELD = {f.name: f.metadata["flag"] for f in dataclasses.fields(FreeKVConfig)}
if FreeKVConfig.__doc__:  # None under python -OO
    FreeKVConfig.__doc__ += "\n    Attributes:\n" + "".join(textwrap.fill(
        f"{f.name} ({f.metadata['flag']}, default {shown_default(f)}): {f.metadata['help']}", 116,
        initial_indent=" " * 8, subsequent_indent=" " * 12, break_on_hyphens=False) + "\n"
        for f in dataclasses.fields(FreeKVConfig))


def resolve_host_memory_bytes(
    cfg: FreeKVConfig, meminfo: Optional[Mapping[str, int]] = None
) -> int:
    """Bytes of pinned host memory FreeKV may use for the full KV cache.

    This is one budget for the whole server: the TP ranks on a host share it.
    The launcher resolves it once (see ``server_config.pin_host_memory``), so
    scheduler processes receive an explicit ``host_memory_gb``.

    An explicit ``host_memory_gb`` is converted to bytes. Auto (``None``) takes
    :data:`AUTO_HOST_MEMORY_FRACTION` of MemAvailable minus
    :data:`AUTO_HOST_MEMORY_RESERVE_BYTES`; it fails if that leaves nothing or if
    ``/proc/meminfo`` cannot be read.
    """
    if cfg.host_memory_gb is not None:
        return int(cfg.host_memory_gb * GIB)
    info = read_meminfo() if meminfo is None else meminfo
    available = info.get("MemAvailable")
    if available is None:
        raise FreeKVConfigError(
            "--freekv-host-memory-gb=auto: cannot read MemAvailable from "
            f"{MEMINFO_PATH}; pass --freekv-host-memory-gb explicitly"
        )
    budget = int(available * AUTO_HOST_MEMORY_FRACTION) - AUTO_HOST_MEMORY_RESERVE_BYTES
    if budget <= 0:
        raise FreeKVConfigError(
            f"--freekv-host-memory-gb=auto: only {available / GIB:.1f} GiB available, "
            "too little for the host KV store; pass --freekv-host-memory-gb explicitly"
        )
    return budget
