"""Which decoding variants run side by side: one *row* of the decode batch per variant.

Every row decodes the same inputs; row 0 is always ``dense`` (the reference). A sparse row is
a FreeKV mode (``oracle``, ``speculative``, ``corrected``) at a selection budget (tokens) and,
for ``corrected``, a threshold ``tau``. All rows share the sink, window and page size.

``exact`` is a diagnostic, not FreeKV: like ``oracle`` (current query, no speculation) but pages
are ranked by their true attention mass instead of the Quest bound of the digests, to tell the
loss due to the bound from the loss due to leaving pages out. ``dense_layers`` keeps some
layers dense (the research accuracy harness keeps layer 0 dense by default).

Mode suffixes: ``+fp8`` (FP8-stored K/V), ``+keepM`` (residency hysteresis), ``+rule=NAME`` (another
page-scoring rule, :mod:`freekv_sglang.algorithm.scoring_rules`; default ``quest``), ``+agg=NAME`` (this
row's GQA aggregation instead of the run's) and ``+overfetch=N`` (speculative over-fetch of ``N`` tokens of
pages beyond the budget, ``--freekv-overfetch-tokens``; speculative modes only), e.g.
``corrected@0.9+rule=box2+agg=softmax-mean`` or ``corrected@0.9+overfetch=512``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..algorithm import RetrievalSettings, WorkingSetLayout

# Defaults scaled for an 8K-context model (the paper's 512/512 sink/window is for 128K-class
# models and would cover too much of a 4-7K context).
PAGE_SIZE = 32
SINK_TOKENS = 128  # 4 pages
WINDOW_TOKENS = 256  # 8 pages (7 full + the current one)
BUDGETS = (256, 512, 1024)  # selected tokens per KV head: 8, 16, 32 pages


@dataclass(frozen=True)
class RowSpec:
    """One decoding variant.

    ``mode``: dense | oracle | speculative | corrected; ``budget``: selected tokens (None for
    dense); ``tau``: correction threshold (corrected only).
    """

    mode: str
    budget: int | None = None
    tau: float | None = None
    page_size: int = PAGE_SIZE
    sink_tokens: int = SINK_TOKENS
    window_tokens: int = WINDOW_TOKENS
    gqa_aggregation: str = "mean"
    dense_layers: tuple = ()
    kv_fp8: bool = False  # FreeKV's stored K/V (tiers, working sets, digests) in FP8 e4m3
    keep_margin: int = 0  # residency hysteresis in pages (algorithm.selection.sticky_scores)
    scoring: str = "quest"  # page-scoring rule (algorithm.scoring_rules.get_rule)
    row_aggregation: str | None = None  # this row's GQA aggregation (+agg=NAME), else gqa_aggregation
    overfetch_tokens: int = 0  # speculative over-fetch beyond the budget (+overfetch=N)

    @property
    def mode_name(self) -> str:
        """``dense``, ``oracle``, ``speculative``, ``exact`` or ``corrected@<tau>`` (+ dense layers, + fp8)."""
        name = f"corrected@{self.tau:g}" if self.mode == "corrected" else self.mode
        if self.dense_layers and self.mode != "dense":
            name += "+dense" + ",".join(f"L{i}" for i in self.dense_layers)
        if self.kv_fp8 and self.mode != "dense":
            name += "+fp8"
        if self.keep_margin and self.mode != "dense":
            name += f"+keep{self.keep_margin}"
        if self.scoring != "quest" and self.mode not in ("dense", "exact"):
            name += f"+rule={self.scoring}"
        if self.row_aggregation and self.mode not in ("dense", "exact"):
            name += f"+agg={self.row_aggregation}"
        if self.overfetch_tokens and self.mode != "dense":
            name += f"+overfetch={self.overfetch_tokens}"
        return name

    @property
    def aggregation(self) -> str:
        return self.row_aggregation or self.gqa_aggregation

    @property
    def label(self) -> str:
        return self.mode_name if self.budget is None else f"{self.mode_name}/{self.budget}"

    @property
    def layout(self) -> WorkingSetLayout | None:
        if self.mode == "dense":
            return None
        return WorkingSetLayout.from_tokens(self.page_size, self.sink_tokens, self.budget, self.window_tokens,
                                            self.overfetch_tokens)

    @property
    def working_set_tokens(self) -> int | None:
        return (None if self.mode == "dense"
                else self.sink_tokens + self.budget + self.overfetch_tokens + self.window_tokens)

    def settings(self) -> RetrievalSettings | None:
        if self.mode == "dense":
            return None
        mode = "oracle" if self.mode == "exact" else self.mode
        return RetrievalSettings.for_mode(mode, self.layout, tau=self.tau, gqa_aggregation=self.aggregation,
                                          keep_margin=self.keep_margin, scoring=self.scoring)


def parse_mode(name: str) -> tuple[str, float | None]:
    """``"corrected@0.9"`` -> ``("corrected", 0.9)``; ``"oracle"`` -> ``("oracle", None)``."""
    if name.startswith("corrected"):
        _, _, tau = name.partition("@")
        return "corrected", float(tau) if tau else 0.9
    if name not in ("dense", "oracle", "speculative", "exact"):
        raise ValueError(f"unknown mode {name!r}; use dense, oracle, speculative, corrected@TAU or exact")
    return name, None


def build_rows(modes, budgets, page_size: int = PAGE_SIZE, sink_tokens: int = SINK_TOKENS,
               window_tokens: int = WINDOW_TOKENS, gqa_aggregation: str = "mean",
               dense_layers=(), scoring: str = "quest") -> list[RowSpec]:
    """Row 0 dense, then every sparse mode at every budget (budget-major order). Suffixes of a mode name:
    ``+fp8`` (``corrected@0.9+fp8``) stores FreeKV's K/V in FP8 e4m3 (:func:`fp8_roundtrip`); ``+keepM``
    (``corrected@0.9+keep8``) keeps a resident page while it ranks within the top ``budget/page + M``;
    ``+rule=NAME`` scores pages with another rule than ``scoring`` (the run's, default ``quest``);
    ``+agg=NAME`` aggregates the query heads of a KV head with NAME instead of ``gqa_aggregation``;
    ``+overfetch=N`` (``corrected@0.9+overfetch=512``) keeps ``N`` tokens of pages resident beyond the budget
    (speculative and corrected modes)."""
    from ..algorithm import AGGREGATIONS
    from ..algorithm.scoring_rules import get_rule

    get_rule(scoring)
    rows = [RowSpec("dense", page_size=page_size, sink_tokens=sink_tokens, window_tokens=window_tokens)]
    sparse = []
    for m in modes:
        if m == "dense":
            continue
        base, *suffixes = m.split("+")
        fp8, keep, rule, agg, over = False, 0, scoring, None, 0
        for sfx in suffixes:
            if sfx == "fp8":
                fp8 = True
            elif sfx.startswith("keep") and sfx[4:].isdigit():
                keep = int(sfx[4:])
            elif sfx.startswith("rule="):
                rule = sfx[5:]
                get_rule(rule)  # fails early on an unknown rule
            elif sfx.startswith("overfetch=") and sfx[10:].isdigit():
                over = int(sfx[10:])
                if over % page_size or parse_mode(base)[0] not in ("speculative", "corrected"):
                    raise ValueError(f"+{sfx} in mode {m!r}: over-fetch takes a multiple of the page size "
                                     f"({page_size}) and a speculative mode (speculative, corrected@TAU)")
            elif sfx.startswith("agg="):
                agg = sfx[4:]
                if agg not in AGGREGATIONS:
                    raise ValueError(f"unknown GQA aggregation {agg!r} in mode {m!r}; choose from {AGGREGATIONS}")
            else:
                raise ValueError(f"unknown suffix +{sfx} in mode {m!r}; use +fp8, +keepM, +rule=NAME, +agg=NAME "
                                 "or +overfetch=N")
        sparse.append((*parse_mode(base), fp8, keep, rule, agg, over))
    for b in budgets:
        for mode, tau, fp8, keep, rule, agg, over in sparse:
            rows.append(RowSpec(mode, int(b), tau, page_size, sink_tokens, window_tokens, gqa_aggregation,
                                tuple(dense_layers), fp8, keep, rule, agg, over))
    return rows


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_roundtrip(t):
    """``t`` stored in FP8 e4m3 and read back (saturating at +-448), in ``t``'s dtype."""
    import torch

    return t.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(t.dtype)
