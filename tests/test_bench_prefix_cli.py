"""launch/bench_prefix.py without a GPU: options, the modes each section compares, percentiles, the report."""

from __future__ import annotations

import math

from launch_scripts import load_launch_script

bp = load_launch_script("bench_prefix")


def test_defaults_match_the_issue_shapes():
    a = bp.parse_args([])
    assert (a.prefix, a.new, a.decoders, a.decode_context, a.conversations, a.turns) == (32768, 256, 8, 32768, 8, 4)
    assert a.long > 120_000 and a.sections == list(bp.SECTIONS)


def test_each_section_compares_the_right_modes():
    a = bp.parse_args(["--host-gb", "20"])
    follow = bp.modes_for("followup", a)
    assert set(follow) == {"freekv-radix", "freekv-no-radix", "dense-radix"}
    assert "--disable-radix-cache" in follow["freekv-no-radix"] and "--disable-radix-cache" not in follow["freekv-radix"]
    assert "--kv-retrieval" not in follow["dense-radix"]
    chunk = bp.modes_for("chunked", a)
    assert chunk["freekv-one-forward"][-2:] == ["--chunked-prefill-size", "-1"]
    assert "--chunked-prefill-size" not in chunk["freekv-chunked"] and "20.0" in chunk["freekv-chunked"]


def test_percentile_by_nearest_rank():
    xs = list(range(1, 101))
    assert bp.percentile(xs, 0.5) in (50, 51) and bp.percentile(xs, 0.99) == 99 and bp.percentile(xs, 1.0) == 100
    assert math.isnan(bp.percentile([], 0.5))


def test_report_states_the_ratios():
    res = {"followup": {"freekv-radix": {"ttft_s": 0.1}, "freekv-no-radix": {"ttft_s": 1.5},
                        "dense-radix": {"ttft_s": 0.05}},
           "chunked": {"freekv-chunked": {"ttft_s": 10.0, "peak_extra_mib": 900,
                                          "itl_during_ms": {"p50": 300.0, "p99": 420.0}},
                       "freekv-one-forward": {"error": "OOM"}},
           "multiturn": {"freekv-radix": {"total_s": 10.0, "prompt_tokens": 100, "prefill_tokens_computed": 40},
                         "freekv-no-radix": {"total_s": 25.0, "prompt_tokens": 100, "prefill_tokens_computed": 100}}}
    text = bp.report(res)
    assert "15.00x faster" in text and "2.00x the time" in text and "2.50x faster" in text
    assert "300.0 / 420.0" in text and "| freekv-one-forward | error |" in text


def test_main_records_provenance_beside_the_results(tmp_path, monkeypatch):
    import json

    import freekv_sglang.provenance as prov

    monkeypatch.setattr(prov, "card", lambda: "NVIDIA H100 80GB HBM3 (81559 MiB, driver 580.159.04)")
    monkeypatch.setattr(bp, "run_section", lambda section, a: {"freekv-radix": {"ttft_s": 0.1}})
    argv = ["--sections", "followup", "--commit", "abc1234", "--out", str(tmp_path)]
    assert bp.main(argv) == 0
    rec = json.loads((tmp_path / "bench_prefix.json").read_text())
    p = rec["provenance"]
    assert p["commit"] == "abc1234" and p["card"].startswith("NVIDIA H100")
    assert p["command"] == "python launch/bench_prefix.py " + " ".join(argv) and "torch" in p["versions"]
    assert rec["results"]["followup"]["freekv-radix"]["ttft_s"] == 0.1
