"""FreeKV's selection logic in plain PyTorch: the spec of record and the oracle for every kernel.

Modules: :mod:`.layout` (working-set pages and slots), :mod:`.digests` (page min/max),
:mod:`.scores` (Quest bound, GQA aggregation), :mod:`.selection` (top-k, residency),
:mod:`.correction` (query-drift check), :mod:`.attention` (dense/sparse/paged references),
:mod:`.reference` (one (request, layer) decoded step by step).
"""

from .attention import dense_attention, paged_attention, sparse_attention
from .correction import correction_flags, query_similarity
from .digests import append_page_digest, page_digests
from .layout import WorkingSetLayout
from .reference import MODES, LayerState, RetrievalSettings, StepStats
from .scores import AGGREGATIONS, aggregate_gqa, quest_scores
from .selection import ResidencyUpdate, changed_pages, residency_update, topk_pages

__all__ = [
    "AGGREGATIONS", "MODES", "LayerState", "ResidencyUpdate", "RetrievalSettings", "StepStats",
    "WorkingSetLayout", "aggregate_gqa", "append_page_digest", "changed_pages", "correction_flags", "dense_attention",
    "page_digests", "paged_attention", "quest_scores", "query_similarity", "residency_update",
    "sparse_attention", "topk_pages",
]
