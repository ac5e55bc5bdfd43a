"""compat: hook targets exist in the installed SGLang, version range, req_pool_idx."""

from __future__ import annotations

import pkgutil
from types import SimpleNamespace

import pytest

from freekv_sglang import compat

TARGETS = [
    compat.SERVER_ARGS_ADD_CLI_ARGS,
    compat.SERVER_ARGS_FROM_CLI_ARGS,
    compat.KV_CONFIGURATOR_BUILD_MHA_POOL,
    compat.KV_CONFIGURATOR_BUILD_REQ_POOL,
    compat.KV_CONFIGURATOR_RESOLVE_POOL_CONFIG,
    compat.MODEL_RUNNER_FORWARD_RAW,
    compat.RELEASE_KV_CACHE,
    compat.METRICS_COLLECTOR_LOG_STATS,
    compat.SCHEDULER_GET_INTERNAL_STATE,
]


@pytest.mark.parametrize("target", TARGETS)
def test_hook_targets_resolve_in_installed_sglang(target):
    owner, attr = target.rsplit(".", 1)
    obj = pkgutil.resolve_name(owner)
    assert callable(getattr(obj, attr))


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
