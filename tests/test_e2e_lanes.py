"""launch/e2e_lanes.py: collection, dealing, and real lanes of pytest on a throwaway test file (CPU)."""

import pytest

from launch_scripts import load_launch_script

lanes = load_launch_script("e2e_lanes")

TESTS = '''
import os
import pytest

@pytest.mark.parametrize("i", range(5))
def test_lane_env(i):
    # every lane sees its own GPU, port and log folder
    assert os.environ["CUDA_VISIBLE_DEVICES"] in ("3", "5")
    assert os.environ["FREEKV_TEST_PORT"] in ("40000", "40010")
    assert os.path.isdir(os.environ["OUT"])
    with open(os.path.join(os.environ["OUT"], f"ran-{i}"), "w") as f:
        f.write(os.environ["CUDA_VISIBLE_DEVICES"])

def test_maybe_fails():
    assert os.environ.get("E2E_LANES_FAIL") != "1"
'''


def test_deal_round_robin():
    assert lanes.deal(list("abcde"), 2) == [["a", "c", "e"], ["b", "d"]]
    assert lanes.deal(list("ab"), 3) == [["a"], ["b"], []]
    with pytest.raises(ValueError):
        lanes.deal(["a"], 0)


def test_lanes_run_each_test_once_and_report_failures(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # test ids are relative to where pytest runs, as from the repo root
    f = tmp_path / "test_fake_e2e.py"
    f.write_text(TESTS)
    ids = lanes.collect([str(f)], None)
    assert len(ids) == 6 and all("::" in i for i in ids)
    assert lanes.collect([str(f)], "nothing_matches") == []
    out = tmp_path / "out"
    argv = [str(f), "--gpus", "3,5", "--out", str(out), "--base-port", "40000", "--no-prepare", "--timeout", "120"]
    monkeypatch.delenv("E2E_LANES_FAIL", raising=False)
    assert lanes.main(argv) == 0
    ran = sorted(p.name for p in out.glob("lane*/ran-*"))
    assert ran == [f"ran-{i}" for i in range(5)]  # each test once, in one of the two lanes
    assert {p.read_text() for p in out.glob("lane0/ran-*")} == {"3"}
    assert {p.read_text() for p in out.glob("lane1/ran-*")} == {"5"}
    printed = capsys.readouterr().out
    assert "6 tests over 2 GPUs (3, 3 per lane)" in printed and "lane 1 (GPU 5, 3 tests): rc=0" in printed
    monkeypatch.setenv("E2E_LANES_FAIL", "1")
    assert lanes.main(argv + ["-k", "maybe_fails"]) == 1
    assert "1 failed" in capsys.readouterr().out
    assert lanes.main(argv + ["-k", "nothing_matches"]) == 5  # an empty selection is not a pass
    assert "no tests collected" in capsys.readouterr().out
