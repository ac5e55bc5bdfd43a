"""Benchmark locality options (CPU, no SGLang run): bench_decode's --locality, the %L mode suffix, the environment
each mode's process gets, and the report header; benchmarks.sh's decode sections run the calibrated setting."""

import argparse
import json
import os
import types
from pathlib import Path

import pytest

from launch_scripts import load_launch_script

ROOT = Path(__file__).resolve().parents[1]
COS, LOC = "FREEKV_BENCH_QUERY_COSINE", "FREEKV_BENCH_LOCALITY"


@pytest.fixture(scope="module")
def bench():
    return load_launch_script("bench_decode")


@pytest.fixture(scope="module")
def variants():
    return load_launch_script("bench_variants")


def test_locality_suffix(variants):
    assert variants.parse_variant("freekv%0.95") == ("freekv", {COS: "0.95", LOC: ""})
    assert variants.parse_variant("freekv%cal") == ("freekv", {COS: "", LOC: "calibrated"})
    assert variants.parse_variant("sync%none@32") == ("sync", {COS: "", LOC: "", "FREEKV_RECALL_PROGRAMS": "32"})
    for bad in ("freekv%", "freekv%1.5", "freekv%0", "freekv%warm", "freekv%0.9%cal", "freekv%16"):
        with pytest.raises(ValueError):
            variants.parse_variant(bad)


def test_a_mode_locality_overrides_the_benchmarks_and_other_modes_keep_it(variants):
    env = {LOC: "calibrated:/x.json", "FREEKV_RECALL_PROGRAMS": "8"}
    assert variants.apply_variant_env({}, dict(env)) == {LOC: "calibrated:/x.json"}  # kept; other variables cleared
    assert variants.apply_variant_env(variants.parse_variant("freekv%0.95")[1], dict(env)) == {COS: "0.95"}
    assert variants.apply_variant_env(variants.parse_variant("freekv%none")[1], {COS: "0.9"}) == {}


def test_locality_option(bench, tmp_path):
    assert bench.locality_spec("calibrated") == "calibrated"  # each mode resolves it for its own page scoring
    f = tmp_path / "loc.json"
    f.write_text("{}")
    assert bench.locality_spec(f"calibrated:{f}") == f"calibrated:{f}"
    for bad in ("random", f"calibrated:{tmp_path / 'none.json'}", str(f)):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.locality_spec(bad)


def test_each_mode_process_gets_its_locality(bench, tmp_path, monkeypatch):
    envs = {}

    def fake_run(cmd, stdout, stderr, timeout, env):
        argv = cmd[cmd.index("--worker") + 1:]
        envs[argv[argv.index("--run-name") + 1]] = {k: env.get(k) for k in (COS, LOC)}
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setenv(COS, "0.5")  # a stray variable of the caller's shell is not passed on
    a = argparse.Namespace(model="m", output_len=64, batch_sizes=[1], contexts=[8000], extra=[], host_gb=10.0,
                           prefill_tokens_per_forward=0, query_cosine=None, locality=bench.locality_spec("calibrated"),
                           timeout=10, relaunches=0)
    for mode in ("dense", "freekv", "sync", "freekv%0.95", "freekv%none", "skip%cal", "freekv-grid2-keep4",
                 "freekv-grid2%cal"):
        bench.run_mode(mode, a, str(tmp_path))
    data = ROOT / "docs" / "data"
    cal, cal_grid2 = (f"calibrated:{data / 'locality-smollm2-135m.json'}",
                      f"calibrated:{data / 'locality-smollm2-135m-grid2.json'}")
    assert envs["dense"] == {COS: None, LOC: None}
    assert envs["freekv"] == envs["sync"] == envs["skip%cal"] == {COS: None, LOC: cal}
    assert envs["freekv-grid2-keep4"] == envs["freekv-grid2%cal"] == {COS: None, LOC: cal_grid2}
    assert envs["freekv%0.95"] == {COS: "0.95", LOC: None}
    assert envs["freekv%none"] == {COS: None, LOC: None}
    assert os.path.exists(tmp_path / "one_batch-freekv-loc0.95.log")


def test_header_names_the_locality(bench, tmp_path):
    a = argparse.Namespace(model=str(tmp_path), query_cosine=None, output_len=64, locality="calibrated:/d/loc.json",
                           modes=["dense", "freekv", "freekv%0.95"])
    h = bench.header("NVIDIA H200", a, None, ["--locality", "calibrated"])
    assert "calibrated query locality (calibrated:/d/loc.json" in h and "own locality: freekv%0.95" in h


def test_the_cli_refuses_two_localities(bench, monkeypatch, capsys):
    monkeypatch.setattr(bench.sys, "argv", ["bench_decode.py", "--locality", "calibrated", "--query-cosine", "0.95"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "not allowed with argument" in capsys.readouterr().err


def test_benchmarks_script_runs_the_calibrated_locality_with_the_optimistic_and_speculation_off_rows():
    text = (ROOT / "launch" / "benchmarks.sh").read_text()
    line = next(l for l in text.splitlines() if l.strip().startswith("decode32k)"))
    rest = text[text.index(line):]
    block = rest[: rest.index(";;")]
    assert "--locality" in text and "BD=(" in text
    assert "freekv%" in block and " sync " in block  # the optimistic row and speculation off beside it
    bd = next(l for l in text.splitlines() if l.startswith("BD=("))
    assert '--locality "$LOCALITY"' in bd and "--query-cosine" not in bd


def test_overlap_benchmark_takes_the_locality_too():
    ov = load_launch_script("bench_overlap")
    assert ov._locality("calibrated").endswith(os.path.join("docs", "data", "locality-smollm2-135m.json"))
    with pytest.raises(argparse.ArgumentTypeError):
        ov._locality("warm")
