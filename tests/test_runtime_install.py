"""Scheduler side of register(): the runtime is installed when requested, loudly or not at all."""

from __future__ import annotations

import sys
import textwrap
import types

import pytest

from freekv_sglang import plugin
from freekv_sglang.config import ENV_VAR, FreeKVConfig

INTEGRATION = "freekv_sglang.runtime.integration"


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.setattr(plugin, "_runtime_installed", False)
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.fixture
def fake_runtime(monkeypatch):
    calls = []
    mod = types.ModuleType(INTEGRATION)
    mod.install_runtime_hooks = calls.append
    monkeypatch.setitem(sys.modules, INTEGRATION, mod)
    return calls


def test_nothing_without_request(fake_runtime, monkeypatch):
    assert plugin.install_runtime_if_requested() is False
    monkeypatch.setenv(ENV_VAR, FreeKVConfig(enabled=False).to_json())
    assert plugin.install_runtime_if_requested() is False
    assert fake_runtime == []


def test_installs_once_with_the_exported_config(fake_runtime, monkeypatch):
    cfg = FreeKVConfig(enabled=True, page_size=16, sink_tokens=32, window_tokens=32,
                       select_tokens=64, host_memory_gb=1)
    monkeypatch.setenv(ENV_VAR, cfg.to_json())
    assert plugin.install_runtime_if_requested() is True
    assert plugin.install_runtime_if_requested() is True
    assert fake_runtime == [cfg]


def test_register_installs_only_in_child_processes(fake_runtime, monkeypatch):
    monkeypatch.setenv(ENV_VAR, FreeKVConfig(enabled=True, host_memory_gb=1).to_json())
    monkeypatch.setattr(plugin, "is_child_process", lambda: False)
    plugin.register()
    assert fake_runtime == []
    monkeypatch.setattr(plugin, "is_child_process", lambda: True)
    plugin.register()
    assert len(fake_runtime) == 1


def test_missing_runtime_is_fatal(monkeypatch, capsys, caplog):
    monkeypatch.setitem(sys.modules, INTEGRATION, None)  # import fails
    monkeypatch.setenv(ENV_VAR, FreeKVConfig(enabled=True, host_memory_gb=1).to_json())
    with pytest.raises(SystemExit) as exc:
        plugin.install_runtime_if_requested()
    assert "runtime could not be installed" in str(exc.value.code)
    assert "Traceback" in capsys.readouterr().err + caplog.text  # stderr or the log


def test_failing_runtime_is_fatal(monkeypatch):
    mod = types.ModuleType(INTEGRATION)

    def boom(cfg):
        raise RuntimeError("no GPU here")

    mod.install_runtime_hooks = boom
    monkeypatch.setitem(sys.modules, INTEGRATION, mod)
    monkeypatch.setenv(ENV_VAR, FreeKVConfig(enabled=True, host_memory_gb=1).to_json())
    with pytest.raises(SystemExit) as exc:
        plugin.install_runtime_if_requested()
    assert "no GPU here" in str(exc.value.code)


def test_corrupt_export_is_fatal(monkeypatch):
    monkeypatch.setenv(ENV_VAR, '{"enabled": true, "page_size": 33}')
    with pytest.raises(SystemExit, match="--freekv-page-size"):
        plugin.install_runtime_if_requested()


def test_spawned_child_dies_instead_of_running_dense(tmp_path, run_python):
    """load_plugins() swallows plugin exceptions; ours must still end the child."""
    script = tmp_path / "spawn_child.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing as mp, os, sys

        def child():
            sys.modules[{INTEGRATION!r}] = None  # the runtime cannot be imported
            from sglang.srt.plugins import load_plugins
            load_plugins()
            print("CHILD KEPT RUNNING", flush=True)

        if __name__ == "__main__":
            os.environ[{ENV_VAR!r}] = {FreeKVConfig(enabled=True, host_memory_gb=1).to_json()!r}
            p = mp.get_context("spawn").Process(target=child)
            p.start()
            p.join()
            print("EXITCODE", p.exitcode, flush=True)
    """))
    proc = run_python([str(script)], timeout=300)
    assert "CHILD KEPT RUNNING" not in proc.stdout
    assert "EXITCODE 1" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "runtime could not be installed" in proc.stderr
