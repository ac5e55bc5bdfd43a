"""compat: every SGLang name resolves in the installed SGLang, the hooks registered are exactly the expected
ones, no other module imports SGLang; version range, req_pool_idx."""

from __future__ import annotations

import ast
import pathlib
from types import SimpleNamespace

import pytest

from freekv_sglang import compat, plugin

PACKAGE = pathlib.Path(compat.__file__).parent
KV_CONFIGURATOR = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
#: (target, hook, kind) of every hook plugin.register and runtime.integration.install_runtime_hooks register
EXPECTED_HOOKS = [
    ("sglang.srt.server_args.ServerArgs.add_cli_args", "freekv_sglang.plugin._after_add_cli_args", "AFTER"),
    ("sglang.srt.server_args.ServerArgs.from_cli_args", "freekv_sglang.plugin._around_from_cli_args", "AROUND"),
    ("sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request",
     "freekv_sglang.request_checks.around_validate_one_request", "AROUND"),
    (f"{KV_CONFIGURATOR}._resolve_memory_pool_config",
     "freekv_sglang.runtime.integration._resolve_memory_pool_config", "AROUND"),
    (f"{KV_CONFIGURATOR}._build_token_to_kv_pool", "freekv_sglang.runtime.integration._build_token_to_kv_pool",
     "AROUND"),
    ("sglang.srt.observability.metrics_collector.SchedulerMetricsCollector.log_stats",
     "freekv_sglang.runtime.integration._after_log_stats", "AFTER"),
    ("sglang.srt.managers.scheduler.Scheduler.get_internal_state",
     "freekv_sglang.runtime.integration._after_get_internal_state", "AFTER"),
    ("sglang.srt.managers.scheduler.Scheduler._add_request_to_queue",
     "freekv_sglang.request_checks.before_add_request_to_queue", "BEFORE"),
]


@pytest.fixture
def recorded_hooks(monkeypatch):
    """Run plugin.register and install_runtime_hooks against a recording HookRegistry and backend registry."""
    from sglang.srt.layers.attention import attention_registry
    from sglang.srt.plugins.hook_registry import HookRegistry

    from freekv_sglang.config import FreeKVConfig
    from freekv_sglang.runtime import integration

    calls, backends = [], {}
    monkeypatch.setattr(HookRegistry, "_hooks", {})
    monkeypatch.setattr(HookRegistry, "register", classmethod(
        lambda cls, target, hook, hook_type, **kw: calls.append(
            (target, f"{hook.__module__}.{hook.__qualname__}", hook_type.name))))
    monkeypatch.setattr(attention_registry, "ATTENTION_BACKENDS", backends)
    monkeypatch.setattr(plugin, "is_child_process", lambda: False)
    monkeypatch.setenv(compat.FORCE_COARSE_WAR_BARRIER.rsplit(".", 1)[1], "0")  # set by install_runtime_hooks
    plugin.register()
    integration.install_runtime_hooks(FreeKVConfig(enabled=True, host_memory_gb=1))
    return calls, backends


def test_registered_hooks_are_exactly_the_expected_ones(recorded_hooks):
    from freekv_sglang.runtime import integration

    calls, backends = recorded_hooks
    assert calls == EXPECTED_HOOKS
    assert [t for t, _, _ in calls] == list(compat.HOOK_TARGETS)
    assert backends == {"freekv": integration._create_backend}


@pytest.mark.parametrize("name", [*compat.HOOK_TARGETS, *compat.INTERNALS])
def test_names_resolve_in_installed_sglang(name):
    obj = compat.resolve(name)
    if name in compat.HOOK_TARGETS:
        assert callable(obj)


def test_accessors_resolve():
    assert compat.flashinfer_backend_class().__name__ == "FlashInferAttnBackend"
    pool = compat.noop_mha_pool_class()
    assert compat.NOOP_MHA_POOL_ALLOCATION_LOG.rsplit(".", 1)[1] in vars(pool)
    assert callable(compat.unwrap_write_loc_fn())
    assert all(callable(f) for f in compat.host_register_fns())
    assert compat.memory_pool_config_class().__name__ == "MemoryPoolConfig"
    assert compat.server_args_class().__name__ == "ServerArgs"
    assert compat.custom_logit_processor_class().__name__ == "CustomLogitProcessor"
    assert int(compat.resolve(compat.FLASHINFER_WORKSPACE_SIZE).get()) > 0
    configurator = compat.resolve(KV_CONFIGURATOR)
    assert callable(getattr(configurator, compat.KV_CONFIGURATOR_PROFILE_AVAILABLE_BYTES.rsplit(".", 1)[1]))
    for getter in ("get_parallel", "get_schedule", "get_buffer", "get_exec"):
        assert callable(getattr(compat.runtime_context(), getter))


def test_resolve_reports_missing_modules():
    with pytest.raises(ModuleNotFoundError):
        compat.resolve("no_such_package_xyz.Thing")
    with pytest.raises(AttributeError):
        compat.resolve("sglang.srt.server_args.NoSuchThing")


def test_runtime_subclasses_use_the_compat_bases():
    from freekv_sglang.runtime.backend import FreeKVAttnBackend
    from freekv_sglang.runtime.pool import FreeKVTokenToKVPool

    assert FreeKVAttnBackend.__bases__ == (compat.flashinfer_backend_class(),)
    assert FreeKVTokenToKVPool.__bases__ == (compat.noop_mha_pool_class(),)


def test_only_compat_imports_sglang():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "compat.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.relative_to(PACKAGE)}:{node.lineno} {n}" for n in names
                          if n == "sglang" or n.startswith("sglang.")]
    assert not offenders, offenders


def test_from_cli_args_is_a_classmethod_and_add_cli_args_a_staticmethod():
    from sglang.srt.server_args import ServerArgs

    assert isinstance(ServerArgs.__dict__["from_cli_args"], classmethod)
    assert isinstance(ServerArgs.__dict__["add_cli_args"], staticmethod)


@pytest.mark.parametrize("version, ok", [("0.5.16", True), ("0.5.17", True),
                                         ("0.5.18.post1", True), ("0.5.15", False),
                                         ("0.5.19", False), ("0.6.0", False), (None, False),
                                         ("garbage", False)])
def test_supported_version_range(version, ok):
    assert compat.is_supported_sglang(version) is ok


def test_installed_sglang_is_supported():
    assert compat.sglang_version() == "0.5.17"
    assert compat.check_sglang_version()


def test_version_warning(monkeypatch, caplog):
    monkeypatch.setattr(compat, "sglang_version", lambda: "0.5.23")
    with caplog.at_level("WARNING", logger="freekv_sglang.compat"):
        assert not compat.check_sglang_version()
    assert "0.5.23" in caplog.text


def test_req_pool_idx_across_versions():
    assert compat.get_req_pool_idx(SimpleNamespace(req_pool_idx=3)) == 3
    assert compat.get_req_pool_idx(SimpleNamespace(kv=SimpleNamespace(req_pool_idx=5))) == 5
    assert compat.get_req_pool_idx(
        SimpleNamespace(req_pool_idx=None, kv=SimpleNamespace(req_pool_idx=7))) == 7
    assert compat.get_req_pool_idx(SimpleNamespace(req_pool_idx=0)) == 0
    assert compat.get_req_pool_idx(SimpleNamespace()) is None
