"""The ``--kv-retrieval`` / ``--freekv-*`` command-line flags.

:func:`add_freekv_arguments` adds them to any argparse parser (SGLang's server
parser, through the plugin hook, or a standalone parser in scripts and tests).
Argparse only converts types and checks choices; the real validation is done
by :class:`freekv_sglang.config.FreeKVConfig`, built with
:meth:`FreeKVConfig.from_namespace`.
"""

from __future__ import annotations

import argparse

from freekv_sglang.config import (
    FLAG_OF_FIELD,
    GQA_AGGREGATION_CHOICES,
    KV_RETRIEVAL_CHOICES,
    KV_STORAGE_CHOICES,
    RECALL_CHOICES,
    FreeKVConfig,
    dest_of_field,
)

GROUP_TITLE = "FreeKV KV retrieval"

_D = FreeKVConfig()  # defaults


def _threshold(text: str) -> str | float:
    """Argparse type for the correction threshold: a float, or 'off'/'none'."""
    if text.strip().lower() in ("off", "none"):
        return "off"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number in [-1, 1] or 'off', got {text!r}"
        ) from None


def has_freekv_arguments(parser: argparse.ArgumentParser) -> bool:
    """True if ``parser`` already has the FreeKV flags (makes adding idempotent)."""
    return FLAG_OF_FIELD["enabled"] in parser._option_string_actions


def add_freekv_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the FreeKV flags to ``parser`` in a group titled "FreeKV KV retrieval"."""
    if has_freekv_arguments(parser):
        return
    g = parser.add_argument_group(
        GROUP_TITLE,
        "KV-cache retrieval: full KV in pinned host memory, a small GPU working set "
        "per request (sink + selected + recent-window pages), speculative page selection.",
    )
    g.add_argument(
        "--kv-retrieval", dest=dest_of_field("enabled"), choices=KV_RETRIEVAL_CHOICES,
        default="none",
        help="KV retrieval method. 'freekv' enables FreeKV; 'none' (default) leaves "
        "SGLang unchanged.",
    )
    g.add_argument(
        "--freekv-page-size", dest=dest_of_field("page_size"), type=int,
        default=_D.page_size, metavar="TOKENS",
        help="Tokens per KV page (power of two, 8-256). Also becomes SGLang's "
        f"--page-size. Default: {_D.page_size}.",
    )
    g.add_argument(
        "--freekv-sink-tokens", dest=dest_of_field("sink_tokens"), type=int,
        default=_D.sink_tokens, metavar="TOKENS",
        help="Leading (attention-sink) tokens always kept on the GPU; a multiple of "
        f"the page size. Default: {_D.sink_tokens}.",
    )
    g.add_argument(
        "--freekv-window-tokens", dest=dest_of_field("window_tokens"), type=int,
        default=_D.window_tokens, metavar="TOKENS",
        help="Recent window kept on the GPU: a ring of full pages plus the page being "
        f"filled; a multiple of the page size, at least 2 pages. Default: {_D.window_tokens}.",
    )
    g.add_argument(
        "--freekv-select-tokens", dest=dest_of_field("select_tokens"), type=int,
        default=_D.select_tokens, metavar="TOKENS",
        help="Budget of selected pages per KV head, in tokens; a multiple of the page "
        f"size, at least 1 page. Default: {_D.select_tokens}.",
    )
    g.add_argument(
        "--freekv-correction-threshold", dest=dest_of_field("correction_threshold"),
        type=_threshold, default=_D.correction_threshold, metavar="COS|off",
        help="Query cosine-similarity threshold in [-1, 1] below which a speculative "
        f"selection is corrected; 'off' disables correction. Default: {_D.correction_threshold}.",
    )
    g.add_argument(
        "--freekv-no-correction", dest=dest_of_field("correction_threshold"),
        action="store_const", const="off", default=_D.correction_threshold,
        help="Same as --freekv-correction-threshold off.",
    )
    g.add_argument(
        "--freekv-speculative", dest=dest_of_field("speculative"), action="store_true",
        default=_D.speculative,
        help="Speculative page selection: select pages for the next step with the "
        "current query, overlapping recall with compute (default: on).",
    )
    g.add_argument(
        "--freekv-no-speculative", dest=dest_of_field("speculative"),
        action="store_false", default=_D.speculative,
        help="Turn speculative page selection off (select and recall synchronously).",
    )
    g.add_argument(
        "--freekv-gqa-aggregation", dest=dest_of_field("gqa_aggregation"),
        choices=GQA_AGGREGATION_CHOICES, default=_D.gqa_aggregation,
        help="How page scores of the query heads sharing a KV head are combined. "
        f"Default: {_D.gqa_aggregation}.",
    )
    g.add_argument(
        "--freekv-host-memory-gb", dest=dest_of_field("host_memory_gb"), type=float,
        default=_D.host_memory_gb, metavar="GIB",
        help="Pinned host memory for the full KV cache, in GiB (2^30 bytes). Default: "
        "auto, a safe fraction of the currently available RAM. Must not exceed total RAM.",
    )
    g.add_argument(
        "--freekv-gpu-tier-gb", dest=dest_of_field("gpu_tier_gb"), type=float,
        default=_D.gpu_tier_gb, metavar="GIB",
        help="GPU memory, in GiB, that holds more requests' full KV beside the host tier (used once the "
        "host tier is full; recall from it stays on the GPU). Taken from SGLang's KV budget, so fewer "
        "working sets fit. Default: 0 (none).",
    )
    g.add_argument(
        "--freekv-kv-storage", dest=dest_of_field("kv_storage"), choices=KV_STORAGE_CHOICES,
        default=_D.kv_storage,
        help="dtype of the full KV cache in the host (and GPU) tier: auto = the model's KV dtype; fp8_e4m3 = "
        "FP8 (half the memory, so twice the tokens, and half the recall traffic; values saturate at +-448, "
        "and what attention sees is the rounded K/V). Default: auto.",
    )
    g.add_argument(
        "--freekv-keep-margin", dest=dest_of_field("keep_margin"), type=int, default=_D.keep_margin,
        metavar="PAGES",
        help="Residency hysteresis: a page already on the GPU stays selected while it ranks within the top "
        "(selected pages + PAGES) of its KV head, so fewer pages are recalled per step, at the price of "
        "attending such a page instead of one ranked just inside the budget. Default: 0 (plain top-k).",
    )
    g.add_argument(
        "--freekv-min-context-tokens", dest=dest_of_field("min_context_tokens"), type=int,
        default=_D.min_context_tokens, metavar="TOKENS",
        help="Requests whose context is shorter run dense. Requests whose context fits "
        "sink + select + window are exact anyway. Default: "
        f"{_D.min_context_tokens}.",
    )
    g.add_argument(
        "--freekv-recall", dest=dest_of_field("recall"), choices=RECALL_CHOICES,
        default=_D.recall,
        help="Host-to-GPU recall: auto (= gather); gather = device-side gather kernel "
        "reading pinned host memory (CUDA-graph safe); staged = double-buffered async "
        "copies through two staging buffers; per-page = one synchronous copy per page "
        "(baseline); skip = no transfers, benchmark upper bound only, outputs are WRONG. "
        f"Default: {_D.recall}.",
    )
