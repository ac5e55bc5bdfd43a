"""FREEKV_SPEC_STREAMS is validated when the runtime is built (CPU: no side streams either way)."""

import pytest
import torch

from freekv_sglang.algorithm import WorkingSetLayout
from freekv_sglang.runtime.engine import FreeKVRuntime, RuntimeSettings
from freekv_sglang.runtime.sizing import ModelShape


def _runtime():
    lay = WorkingSetLayout(page_size=4, n_sink=1, n_select=2, n_window=2)
    r2t = torch.zeros((3, 64), dtype=torch.int32)
    return FreeKVRuntime(ModelShape(1, 2, 1, 16, torch.float32), RuntimeSettings(lay), n_host_pages=40, max_rows=2,
                         req_to_token=r2t, max_batch=2, device="cpu")


def test_bad_value_is_refused(monkeypatch):
    monkeypatch.setenv("FREEKV_SPEC_STREAMS", "3")
    with pytest.raises(ValueError, match="FREEKV_SPEC_STREAMS"):
        _runtime()


def test_cpu_runtime_has_no_side_streams(monkeypatch):
    monkeypatch.setenv("FREEKV_SPEC_STREAMS", "2")
    rt = _runtime()
    assert rt.side_stream is None and rt.recall_stream is None and rt.side_lists is None
