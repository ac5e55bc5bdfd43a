"""launch/e2e_lanes.py: collection, dealing, and real lanes of pytest on a throwaway test file (CPU); the
model folders the server tests it runs write for themselves."""

import json

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

def test_maybe_skips():
    if os.environ.get("E2E_LANES_SKIP") == "1":
        pytest.skip("told to skip")
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
    assert len(ids) == 7 and all("::" in i for i in ids)
    assert lanes.collect([str(f)], "nothing_matches") == []
    out = tmp_path / "out"
    argv = [str(f), "--gpus", "3,5", "--out", str(out), "--base-port", "40000", "--no-prepare", "--timeout", "120"]
    monkeypatch.delenv("E2E_LANES_FAIL", raising=False)
    monkeypatch.delenv("E2E_LANES_SKIP", raising=False)
    assert lanes.main(argv) == 0
    ran = sorted(p.name for p in out.glob("lane*/ran-*"))
    assert ran == [f"ran-{i}" for i in range(5)]  # each test once, in one of the two lanes
    assert {p.read_text() for p in out.glob("lane0/ran-*")} == {"3"}
    assert {p.read_text() for p in out.glob("lane1/ran-*")} == {"5"}
    printed = capsys.readouterr().out
    assert "7 tests over 2 GPUs (4, 3 per lane)" in printed and "lane 1 (GPU 5, 3 tests): rc=0" in printed
    monkeypatch.setenv("E2E_LANES_FAIL", "1")
    assert lanes.main(argv + ["-k", "maybe_fails"]) == 1
    assert "1 failed" in capsys.readouterr().out
    assert lanes.main(argv + ["-k", "nothing_matches"]) == 5  # an empty selection is not a pass
    assert "no tests collected" in capsys.readouterr().out


def test_a_lane_whose_tests_all_skip_fails(tmp_path, monkeypatch, capsys):
    """pytest exits 0 when every test skips (no CUDA device, a missing model folder): e2e_lanes does not."""
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "test_fake_e2e.py"
    f.write_text(TESTS)
    out = tmp_path / "out"
    argv = [str(f), "--gpus", "3", "--out", str(out), "--base-port", "40000", "--no-prepare", "--timeout", "120"]
    monkeypatch.delenv("E2E_LANES_FAIL", raising=False)
    monkeypatch.setenv("E2E_LANES_SKIP", "1")
    assert lanes.main(argv + ["-k", "maybe_skips"]) == 1
    printed = capsys.readouterr().out
    assert "rc=0; 1 skipped" in printed and "lane 0: every test was skipped" in printed
    # some tests skipped, others passed: a pass
    assert lanes.main(argv + ["-k", "maybe_skips or maybe_fails"]) == 0
    printed = capsys.readouterr().out
    assert "1 passed, 1 skipped" in printed and "every test was skipped" not in printed
    # two GPUs: one lane skips everything, the other passes: still a failure
    two = [a if a != "3" else "3,5" for a in argv]
    assert lanes.main(two + ["-k", "maybe_skips or maybe_fails"]) == 1
    assert "every test was skipped" in capsys.readouterr().out


@pytest.mark.parametrize("summary,skipped_only", [
    ("14 skipped in 0.05s", True),
    ("========================= 2 skipped in 1.00s =========================", True),
    ("3 passed, 2 skipped in 100.20s (0:01:40)", False),
    ("1 failed, 4 skipped in 3.00s", False),
    ("1 error, 4 skipped in 3.00s", False),
    ("4 skipped, 1 xfailed in 3.00s", False),
    ("5 passed in 2.00s", False),
    ("no tests ran in 0.01s", False),
])
def test_only_skipped_reads_the_pytest_summary(summary, skipped_only):
    assert lanes.only_skipped(summary) is skipped_only


def test_server_test_models_come_from_the_repository(tmp_path, monkeypatch):
    """The server tests serve folders they write themselves (freekv_sglang.testing.shape_models): the
    Llama-3.1-8B and Qwen2.5-7B shapes, and a tokenizer SGLang's text endpoints can use."""
    from freekv_sglang.testing.shape_models import model_folder, write_shape_model

    llama = write_shape_model(tmp_path / "llama", "llama-8b-shape")
    cfg = json.loads((llama / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "bfloat16"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (4096, 14336, 32)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (32, 8, 128)
    assert cfg["rope_theta"] == 5e5 and cfg["max_position_embeddings"] == 131072 and cfg["vocab_size"] == 49152
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    qwen = json.loads((write_shape_model(tmp_path / "qwen", "qwen2.5-7b-shape") / "config.json").read_text())
    assert (qwen["model_type"], qwen["hidden_size"], qwen["num_hidden_layers"], qwen["num_key_value_heads"]) == \
        ("qwen2", 3584, 28, 4)
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(llama)
    assert len(tok) == 49152 and (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "Which layout does the host tier use?"
    assert tok.decode(tok.encode(text)) == text
    assert isinstance(tok.decode(list(range(0, 49152, 997))), str)  # any id decodes
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # without FREEKV_TEST_MODEL the folder is written; a folder it names must exist (an error, not a skip)
    monkeypatch.delenv("FREEKV_TEST_MODEL", raising=False)
    written = model_folder("llama-8b-shape", "FREEKV_TEST_MODEL", tmp_path / "w")
    assert json.loads((tmp_path / "w" / "llama-8b-shape" / "config.json").read_text()) == cfg
    monkeypatch.setenv("FREEKV_TEST_MODEL", written)
    assert model_folder("llama-8b-shape", "FREEKV_TEST_MODEL", tmp_path / "x") == written
    monkeypatch.setenv("FREEKV_TEST_MODEL", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="FREEKV_TEST_MODEL"):
        model_folder("llama-8b-shape", "FREEKV_TEST_MODEL", tmp_path / "y")
