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


class _FakeServer:
    """Advances a fake clock by a fixed prefill cost plus ``step_s`` per new token (and extra noise)."""

    def __init__(self, clock, step_s, prefill_s=(2.0,)):
        self.clock, self.step_s, self.prefill_s, self.calls = clock, step_s, list(prefill_s), 0

    def generate_many(self, prompts, new, timeout):
        self.clock[0] += self.prefill_s[self.calls % len(self.prefill_s)] + self.step_s * new
        self.calls += 1
        return [{"output_ids": [0] * new} for _ in prompts]


def test_decode_ms_is_the_median_difference(bench, monkeypatch):
    import random

    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    srv = _FakeServer(clock, 0.010, prefill_s=(2.0, 2.0, 2.0, 2.1, 2.0, 2.0))  # one noisy pair
    r = bench.decode_ms_per_step(srv, random.Random(0), 64, 2, 16, 116, 1000, 10.0, repeats=3)
    assert r["decode_ms_per_step"] == pytest.approx(10.0)
    assert sorted(r["decode_ms_per_step_all"]) == pytest.approx([10.0, 10.0, 11.0])


def test_noise_above_decode_time_is_an_error_not_a_negative_time(bench, monkeypatch):
    import random

    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    srv = _FakeServer(clock, 0.001, prefill_s=(13.0, 2.0))  # a cold first prompt
    with pytest.raises(RuntimeError, match="not slower"):
        bench.decode_ms_per_step(srv, random.Random(0), 64, 1, 16, 144, 1000, 10.0)
