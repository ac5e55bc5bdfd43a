"""The calibrated synthetic-query kernel (kernels/synthetic_query.py) under Triton's CPU interpreter, against its
torch spec. Re-runs itself with TRITON_INTERPRET=1 in a fresh process, as tests/test_kernels_interpreter.py does."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile

import pytest

CHILD = os.environ.get("TRITON_INTERPRET") == "1"

if not CHILD:

    def test_calibrated_query_kernel_under_interpreter():
        pytest.importorskip("triton")
        env = dict(os.environ, TRITON_INTERPRET="1")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
                           env=env, capture_output=True, text=True, timeout=900, cwd=tempfile.gettempdir())
        assert r.returncode == 0, f"interpreter run failed:\n{r.stdout[-8000:]}\n{r.stderr[-4000:]}"
        assert " passed" in r.stdout

else:

    import torch

    from freekv_sglang.kernels.common import interpreter_forced
    from freekv_sglang.kernels.synthetic_query import calibrated_queries

    def test_interpreter_is_on():
        assert interpreter_forced()

    @pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
    @pytest.mark.parametrize("hq,hkv,d,nb", [(32, 8, 128, 3), (9, 3, 64, 1), (28, 4, 128, 2), (4, 4, 16, 2)])
    def test_calibrated_queries(dtype, hq, hkv, d, nb):
        g = torch.Generator().manual_seed(hq + d)
        u = torch.nn.functional.normalize(torch.randn(5, hq, d, generator=g), dim=-1) * math.sqrt(d)
        noise = torch.randn(64, d, generator=g)
        quant = torch.sort(torch.rand(hkv, 101, generator=g), dim=-1).values.contiguous()
        kappa = torch.rand(hkv, nb, generator=g).contiguous()
        q_prev = torch.randn(7, hq, d, generator=g).to(dtype)
        q_prev[2] = 0  # a row with no previous query: starts from its anchor
        rows = torch.tensor([0, 2, 6, 3])
        n = torch.tensor([100, 5000, 70000, 2 ** 20 + 3])
        q = torch.zeros(4, hq, d, dtype=dtype)
        kw = dict(layer=5, seed=3, group=hq // hkv, bin0=12.0, decoy=1 / 1024, pull=0.5)
        got = calibrated_queries(q, q_prev, u, noise, quant, kappa, rows, n, impl="triton", **kw)
        want = calibrated_queries(q, q_prev, u, noise, quant, kappa, rows, n, impl="torch", **kw)
        assert got.dtype == dtype and got.shape == q.shape
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)

    def test_calibrated_queries_checks_its_tables():
        q = torch.zeros(1, 8, 16, dtype=torch.bfloat16)
        args = (q, q, torch.zeros(1, 8, 16), torch.zeros(4, 16), torch.zeros(3, 101), torch.zeros(3, 1),
                torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long))
        with pytest.raises(ValueError, match="query heads"):
            calibrated_queries(*args, layer=0, seed=0, group=4, bin0=12.0, decoy=1e-3, pull=0.5, impl="triton")
