"""FreeKV GPU data path: Triton kernels (and a FlashInfer wrapper), each beside its
plain-torch reference. Installed as ``freekv_sglang.kernels``.

Modules (one op each):

* :mod:`.kv_store`     ``store_kv_host``           fresh K/V rows -> pinned host store (HND)
* :mod:`.digests`      ``page_digests_from_rows``  page max/min digests
* :mod:`.scores`       ``score_pages``             Quest bound of candidates, GQA-aggregated
* :mod:`.grid_codes`   ``score_pages_grid``        grid2 page scores from 2-bit key codes (``pack_grid_codes``);
                                                   not used by the runtime yet
* :mod:`.select`       ``select_update``           top-k + residency update of request rows, in place
* :mod:`.score_select` ``score_and_select``        scoring + block top-k + residency, two launches
* :mod:`.decode_prologue` ``decode_prologue``      token write, digest, correction check, one launch
* :mod:`.recall`       ``recall_selected`` (runtime), ``recall_gather`` (+ staged, per-page)
* :mod:`.page_table`   ``build_page_table``        FlashInfer metadata of the working sets
* :mod:`.sparse_decode` ``SparseDecode``           FlashInfer paged decode over the slots
* :mod:`.split_decode`  ``split_decode_attention`` Triton decode over the slots, split along them (no plan)
* :mod:`.uva`          zero-copy pinned-memory kernel arguments
* :mod:`.synthetic_query` ``mix_queries``          benchmark-only synthetic decode queries, one launch
* :mod:`.stream_read`  ``stream_sum``              benchmark-only streaming read of a buffer (bandwidth floor)

Wrappers run Triton on CUDA tensors and the reference otherwise (``impl=`` forces one).
Kernels only the benchmarks use live in ``launch/extra_kernels.py`` (not installed); from a checkout the
names of :data:`IN_LAUNCH` still resolve here.
"""

from .digests import page_digests_from_rows, page_digests_from_rows_reference
from .grid_codes import pack_grid_codes, pack_grid_codes_reference, score_pages_grid, score_pages_grid_reference
from .kv_store import store_kv_host, store_kv_host_reference
from .page_table import (build_page_table, build_page_table_reference, last_page_len_host,
                         page_table_indptr_host)
from .recall import (StagedRecall, recall_gather, recall_gather_reference, recall_per_page, recall_reference,
                     recall_selected, recall_selected_pieces, recall_selected_reference, recall_staged)
from .score_select import score_and_select, score_and_select_reference
from .scores import score_pages, score_pages_reference
from .select import select_update, select_update_reference
from .sparse_decode import SparseDecode, sparse_decode_reference
from .split_decode import SplitDecode, split_decode_attention
from .stream_read import stream_sum, stream_sum_reference
from .uva import kernel_arg

__all__ = [
    "SparseDecode", "SplitDecode", "StagedRecall", "build_page_table", "build_page_table_reference", "kernel_arg",
    "last_page_len_host", "page_digests_from_rows", "page_digests_from_rows_reference", "page_table_indptr_host",
    "recall_gather", "recall_gather_reference", "recall_per_page", "recall_reference", "recall_selected",
    "recall_selected_pieces", "recall_selected_reference", "recall_staged", "score_and_select",
    "score_and_select_reference", "score_pages", "score_pages_reference", "select_update", "select_update_reference",
    "sparse_decode_reference", "split_decode_attention", "store_kv_host", "store_kv_host_reference", "stream_sum",
    "stream_sum_reference",
    "pack_grid_codes", "pack_grid_codes_reference", "score_pages_grid", "score_pages_grid_reference",
]

#: Benchmark-only kernels moved to ``launch/extra_kernels.py``; kept reachable as attributes of this package from
#: a checkout (the kernel benchmark imports them from here).
IN_LAUNCH = ("XqaDecode", "block_table_from_page_table", "select_and_diff", "select_and_diff_reference")


def __getattr__(name: str):
    if name not in IN_LAUNCH:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib.util
    import sys
    from pathlib import Path

    mod = sys.modules.get("extra_kernels")
    if mod is None:
        path = Path(__file__).resolve().parents[1] / "launch" / "extra_kernels.py"
        if not path.is_file():
            raise AttributeError(f"{name} is in launch/extra_kernels.py, which only a checkout has")
        spec = importlib.util.spec_from_file_location("extra_kernels", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["extra_kernels"] = mod
        spec.loader.exec_module(mod)
    return getattr(mod, name)
