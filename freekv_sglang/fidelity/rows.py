"""Which decoding variants run side by side: one *row* of the decode batch per variant.

Every row decodes the same inputs; row 0 is always ``dense`` (the reference). A sparse row is
a FreeKV mode (``oracle``, ``speculative``, ``corrected``) at a selection budget (tokens) and,
for ``corrected``, a threshold ``tau``. All rows share the sink, window and page size.

``exact`` is a diagnostic, not FreeKV: like ``oracle`` (current query, no speculation) but pages
are ranked by their true attention mass instead of the Quest bound of the digests, to tell the
loss due to the bound from the loss due to leaving pages out. ``dense_layers`` keeps some
layers dense (the research accuracy harness keeps layer 0 dense by default).
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
MODE_NAMES = ("dense", "oracle", "speculative", "corrected@0.8", "corrected@0.9")


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

    @property
    def mode_name(self) -> str:
        """``dense``, ``oracle``, ``speculative``, ``exact`` or ``corrected@<tau>`` (+ dense layers, + fp8)."""
        name = f"corrected@{self.tau:g}" if self.mode == "corrected" else self.mode
        if self.dense_layers and self.mode != "dense":
            name += "+dense" + ",".join(f"L{i}" for i in self.dense_layers)
        if self.kv_fp8 and self.mode != "dense":
            name += "+fp8"
        return name

    @property
    def label(self) -> str:
        return self.mode_name if self.budget is None else f"{self.mode_name}/{self.budget}"

    @property
    def layout(self) -> WorkingSetLayout | None:
        if self.mode == "dense":
            return None
        return WorkingSetLayout.from_tokens(self.page_size, self.sink_tokens, self.budget, self.window_tokens)

    @property
    def working_set_tokens(self) -> int | None:
        return None if self.mode == "dense" else self.sink_tokens + self.budget + self.window_tokens

    def settings(self) -> RetrievalSettings | None:
        if self.mode == "dense":
            return None
        mode = "oracle" if self.mode == "exact" else self.mode
        return RetrievalSettings.for_mode(mode, self.layout, tau=self.tau, gqa_aggregation=self.gqa_aggregation)


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
               dense_layers=()) -> list[RowSpec]:
    """Row 0 dense, then every sparse mode at every budget (budget-major order). A mode name ending in
    ``+fp8`` (``corrected@0.9+fp8``) stores FreeKV's K/V in FP8 e4m3 (:func:`fp8_roundtrip`)."""
    rows = [RowSpec("dense", page_size=page_size, sink_tokens=sink_tokens, window_tokens=window_tokens)]
    sparse = []
    for m in modes:
        if m == "dense":
            continue
        fp8 = m.endswith("+fp8")
        sparse.append((*parse_mode(m[: -len("+fp8")] if fp8 else m), fp8))
    for b in budgets:
        for mode, tau, fp8 in sparse:
            rows.append(RowSpec(mode, int(b), tau, page_size, sink_tokens, window_tokens, gqa_aggregation,
                                tuple(dense_layers), fp8))
    return rows


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_roundtrip(t):
    """``t`` stored in FP8 e4m3 and read back (saturating at +-448), in ``t``'s dtype."""
    import torch

    return t.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(t.dtype)
