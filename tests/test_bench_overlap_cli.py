"""launch/bench_overlap.py: the report of the overlap-scheduler cost (CPU, no server)."""

import pytest

from launch_scripts import load_launch_script


@pytest.fixture(scope="module")
def bench():
    return load_launch_script("bench_overlap")


def test_report_ratios(bench):
    res = {"dense": [{"context": 32000, "batch": 8, "decode_ms_per_step": 14.0}],
           "dense-no-overlap": [{"context": 32000, "batch": 8, "decode_ms_per_step": 15.4}],
           "freekv": [{"context": 32000, "batch": 8, "decode_ms_per_step": 11.0}, {"error": "x"}]}
    md = bench.report(res)
    assert "| 32000 | 8 | 14.00 | 15.40 | 11.00 | 1.10x | 1.27x | 1.40x |" in md


def test_long_must_exceed_short(bench):
    with pytest.raises(SystemExit):
        bench.main(["--short", "64", "--long", "16"])


def test_report_with_freekv_overlap(bench):
    res = {"dense": [{"context": 8000, "batch": 1, "decode_ms_per_step": 7.0}],
           "freekv": [{"context": 8000, "batch": 1, "decode_ms_per_step": 6.0}],
           "freekv-overlap": [{"context": 8000, "batch": 1, "decode_ms_per_step": 5.0}]}
    md = bench.report(res)
    assert "FreeKV overlap off / on" in md
    assert md.splitlines()[-1].endswith("| 1.20x |")
