"""The plugin on SGLang's real argument parsing (``prepare_server_args``).

Most tests parse in this process after ``load_plugins()``; a few run the stock
launcher in a subprocess, exactly as a user would.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.metadata
import os
import pickle
import textwrap
import time

import pytest

from freekv_sglang import compat, plugin
from freekv_sglang.config import ENV_VAR, FreeKVConfig

FLAGS = ["--kv-retrieval", "--freekv-page-size", "--freekv-sink-tokens",
         "--freekv-window-tokens", "--freekv-select-tokens", "--freekv-correction-threshold",
         "--freekv-no-correction", "--freekv-speculative", "--freekv-no-speculative",
         "--freekv-gqa-aggregation", "--freekv-host-memory-gb",
         "--freekv-min-context-tokens", "--freekv-recall"]


@pytest.fixture(scope="module")
def sglang_with_plugin():
    """Load plugins the way the launcher does; register() again must be harmless."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry

    load_plugins()
    plugin.register()
    HookRegistry.apply_hooks()
    from sglang.srt import server_args

    return server_args


@pytest.fixture(autouse=True)
def no_exported_config(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.fixture
def parse(sglang_with_plugin, base_argv):
    def _parse(*argv: str):
        return sglang_with_plugin.prepare_server_args([*base_argv, *argv])

    return _parse


def fields_of(sa) -> dict:
    return {f.name: getattr(sa, f.name) for f in dataclasses.fields(sa)}


# ----------------------------------------------------------------- discovery
def test_entry_point_is_discoverable():
    eps = importlib.metadata.entry_points(group="sglang.srt.plugins")
    (ep,) = [e for e in eps if e.name == "freekv"]
    assert ep.value == "freekv_sglang.plugin:register"
    assert ep.load() is plugin.register


def test_register_is_idempotent(sglang_with_plugin):
    from sglang.srt.plugins.hook_registry import HookRegistry

    plugin.register()
    plugin.register()
    for target in (compat.SERVER_ARGS_ADD_CLI_ARGS, compat.SERVER_ARGS_FROM_CLI_ARGS):
        ours = [h for _, h, _ in HookRegistry._hooks[target] if h.__module__ == plugin.__name__]
        assert len(ours) == 1, target
    assert sglang_with_plugin.ATTENTION_BACKEND_CHOICES.count("freekv") == 1


# ------------------------------------------------------------------ parsing
def test_every_flag_parses_with_its_default(sglang_with_plugin):
    import argparse

    parser = argparse.ArgumentParser()
    sglang_with_plugin.ServerArgs.add_cli_args(parser)
    ns = parser.parse_args(["--model-path", "m"])
    cfg = FreeKVConfig.from_namespace(ns)
    assert cfg == FreeKVConfig()
    for flag in FLAGS:
        assert flag in parser._option_string_actions, flag
    titles = [g.title for g in parser._action_groups]
    assert "FreeKV KV retrieval" in titles


def test_default_run_is_stock_and_unmarked(parse):
    sa = parse()
    assert not hasattr(sa, "_freekv")
    assert ENV_VAR not in os.environ
    assert sa.attention_backend != "freekv"


def test_kv_retrieval_none_matches_sglang_without_plugin(parse, base_argv, run_python):
    """Parsed ServerArgs equal those of a process where the plugin is not loaded."""
    script = textwrap.dedent(f"""
        import base64, dataclasses, pickle, sys
        from sglang.srt.plugins import load_plugins
        from sglang.srt.plugins.hook_registry import HookRegistry
        load_plugins()
        assert not HookRegistry._hooks, "plugin unexpectedly loaded"
        from sglang.srt.server_args import prepare_server_args
        sa = prepare_server_args({base_argv!r})
        out = {{f.name: getattr(sa, f.name) for f in dataclasses.fields(sa)}}
        print("RESULT=" + base64.b64encode(pickle.dumps((out, sorted(vars(sa))))).decode())
    """)
    proc = run_python(["-c", script], env_extra={"SGLANG_PLUGINS": "not-freekv"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT=")][-1]
    ref_fields, ref_attrs = pickle.loads(base64.b64decode(line[len("RESULT="):]))

    for argv in ([], ["--kv-retrieval", "none"], ["--kv-retrieval", "none",
                                                    "--freekv-page-size", "64"]):
        sa = parse(*argv)
        ours = fields_of(sa)
        diff = {k for k in ref_fields if ref_fields[k] != ours.get(k)}
        assert not diff, {k: (ref_fields[k], ours.get(k)) for k in diff}
        assert set(ours) == set(ref_fields)
        assert sorted(vars(sa)) == ref_attrs


def test_freekv_applies_overrides_and_survives_pickle(parse, capsys):
    sa = parse("--kv-retrieval", "freekv")
    assert sa.attention_backend == "freekv"
    assert sa.page_size == 32
    # SGLang's radix cache and chunked prefill stay on: FreeKV serves cached prefixes from its host tier
    assert sa.disable_radix_cache is False
    assert sa.chunked_prefill_size > 0
    assert sa.disable_overlap_schedule is True
    assert sa.disable_prefill_cuda_graph is True
    assert compat.cuda_graphs_disabled(sa, phases=("prefill",)) is True
    assert compat.cuda_graphs_disabled(sa, phases=("decode",)) is False  # decode steps are captured
    cfg = sa._freekv
    assert isinstance(cfg, FreeKVConfig) and cfg.enabled
    assert cfg.host_memory_gb is not None and cfg.host_memory_gb > 0  # auto pinned at launch
    clone = pickle.loads(pickle.dumps(sa))
    assert clone._freekv == cfg
    assert FreeKVConfig.from_json(os.environ[ENV_VAR]) == cfg
    err = capsys.readouterr().err
    assert "FreeKV enabled: page_size=32 sink=512 window=512 select=1024" in err
    assert "set attention_backend='freekv'" in err
    assert "chunked_prefill_size" not in err and "disable_radix_cache" not in err


def test_freekv_flags_reach_the_config(parse):
    sa = parse("--kv-retrieval", "freekv", "--freekv-page-size", "64",
               "--freekv-sink-tokens", "128", "--freekv-window-tokens", "256",
               "--freekv-select-tokens", "2048", "--freekv-correction-threshold", "off",
               "--freekv-no-speculative", "--freekv-gqa-aggregation", "max",
               "--freekv-host-memory-gb", "1.5", "--freekv-min-context-tokens", "2048",
               "--freekv-recall", "staged", "--chunked-prefill-size", "4096")
    assert sa.page_size == 64 and sa.chunked_prefill_size == 4096  # the user's chunk size stays
    assert sa._freekv == FreeKVConfig(
        enabled=True, page_size=64, sink_tokens=128, window_tokens=256, select_tokens=2048,
        correction_threshold=None, speculative=False, gqa_aggregation="max",
        host_memory_gb=1.5, min_context_tokens=2048, recall="staged")


def test_matching_explicit_flags_are_accepted(parse):
    sa = parse("--kv-retrieval", "freekv", "--attention-backend", "freekv",
               "--page-size", "32", "--freekv-no-correction", "--kv-cache-dtype", "bf16")
    assert sa._freekv.correction_threshold is None


def test_skip_recall_warns_loudly(parse, capsys):
    parse("--kv-retrieval", "freekv", "--freekv-recall", "skip")
    assert "outputs are WRONG" in capsys.readouterr().err


# ------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--freekv-page-size", "33"], ["--freekv-page-size", "33"]),
        (["--freekv-page-size", "4"], ["--freekv-page-size", "4"]),
        (["--freekv-page-size", "512"], ["--freekv-page-size", "512"]),
        (["--freekv-sink-tokens", "100"], ["--freekv-sink-tokens", "100"]),
        (["--freekv-sink-tokens", "-32"], ["--freekv-sink-tokens", "-32"]),
        (["--freekv-window-tokens", "32"], ["--freekv-window-tokens", "32"]),
        (["--freekv-select-tokens", "0"], ["--freekv-select-tokens", "0"]),
        (["--freekv-select-tokens", "48"], ["--freekv-select-tokens", "48"]),
        (["--freekv-correction-threshold", "1.5"], ["--freekv-correction-threshold", "1.5"]),
        (["--freekv-correction-threshold", "-3"], ["--freekv-correction-threshold", "-3"]),
        (["--freekv-correction-threshold", "high"], ["--freekv-correction-threshold", "high"]),
        (["--freekv-host-memory-gb", "0"], ["--freekv-host-memory-gb", "0"]),
        (["--freekv-host-memory-gb", "-4"], ["--freekv-host-memory-gb", "-4"]),
        (["--freekv-host-memory-gb", "1000000"], ["--freekv-host-memory-gb", "1000000",
                                                  "total RAM"]),
        (["--freekv-min-context-tokens", "-1"], ["--freekv-min-context-tokens", "-1"]),
        (["--freekv-gqa-aggregation", "median"], ["--freekv-gqa-aggregation", "median"]),
        (["--freekv-recall", "dma"], ["--freekv-recall", "dma"]),
        (["--freekv-page-size", "abc"], ["--freekv-page-size", "abc"]),
    ],
)
def test_invalid_values_exit_nonzero_with_message(parse, capsys, argv, needles):
    with pytest.raises(SystemExit) as exc:
        parse("--kv-retrieval", "freekv", *argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err[-500:])
    assert ENV_VAR not in os.environ


def test_invalid_kv_retrieval_choice(parse, capsys):
    with pytest.raises(SystemExit) as exc:
        parse("--kv-retrieval", "quest")
    assert exc.value.code == 2 and "--kv-retrieval" in capsys.readouterr().err


def test_invalid_values_are_checked_even_when_disabled(parse, capsys):
    with pytest.raises(SystemExit):
        parse("--freekv-page-size", "33")
    assert "--freekv-page-size" in capsys.readouterr().err


# ------------------------------------------------- unsupported combinations
@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--pp-size", "2"], "--pp-size"),
        (["--speculative-algorithm", "EAGLE"], "--speculative-algorithm"),
        (["--attention-backend", "triton"], "--attention-backend"),
        (["--decode-attention-backend", "triton"], "--decode-attention-backend"),
        (["--prefill-attention-backend", "torch_native"], "--prefill-attention-backend"),
        (["--page-size", "64"], "--page-size"),
        (["--kv-cache-dtype", "fp8_e4m3"], "--kv-cache-dtype"),
        (["--kv-cache-dtype", "fp4_e2m1"], "--kv-cache-dtype"),
        (["--enable-hierarchical-cache"], "--enable-hierarchical-cache"),
        (["--enable-dp-attention"], "--enable-dp-attention"),
        (["--disaggregation-mode", "prefill"], "--disaggregation-mode"),
    ],
)
def test_unsupported_combinations_are_refused(parse, capsys, argv, flag):
    with pytest.raises(SystemExit) as exc:
        parse("--kv-retrieval", "freekv", *argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "not supported" in err and "yet" in err, err[-500:]


def test_unsupported_flags_are_fine_without_freekv(parse):
    sa = parse("--attention-backend", "triton", "--page-size", "64")
    assert sa.attention_backend == "triton" and sa.page_size == 64


def test_mla_model_is_refused_before_loading(sglang_with_plugin, mla_model, capsys):
    with pytest.raises(SystemExit) as exc:
        sglang_with_plugin.prepare_server_args(
            ["--model-path", mla_model, "--device", "cpu", "--kv-retrieval", "freekv"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "MLA" in err and "--model-path" in err and "not supported" in err


# ------------------------------------------------------ the stock launcher
def test_launch_server_help_lists_flags(run_python):
    proc = run_python(["-m", "sglang.launch_server", "--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "FreeKV KV retrieval" in proc.stdout
    for flag in FLAGS:
        assert flag in proc.stdout, flag


def test_launch_server_bad_page_size_exits_fast(run_python):
    start = time.monotonic()
    proc = run_python(["-m", "sglang.launch_server", "--model-path", "x",
                       "--kv-retrieval", "freekv", "--freekv-page-size", "33"], timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "--freekv-page-size" in proc.stderr and "33" in proc.stderr
    assert elapsed < 60, elapsed


def test_every_flag_is_documented():
    """docs/USAGE.md lists every flag the plugin adds (and no flag it does not add)."""
    import argparse
    import pathlib
    import re

    from freekv_sglang.cli import add_freekv_arguments

    p = argparse.ArgumentParser()
    add_freekv_arguments(p)
    flags = {s for a in p._actions for s in a.option_strings if s.startswith(("--freekv", "--kv-retrieval"))}
    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "USAGE.md").read_text()
    documented = set(re.findall(r"`(--(?:freekv-[a-z0-9-]+|kv-retrieval))", doc))
    assert flags == documented, (sorted(flags - documented), sorted(documented - flags))


def test_usage_flag_table_and_docstring_are_generated():
    """docs/USAGE.md's flag table is ``flag_table()`` (regenerate: python -c "from freekv_sglang.cli import
    flag_table; print(flag_table())"), and FreeKVConfig's docstring lists every setting's help text."""
    import dataclasses
    import pathlib

    from freekv_sglang.cli import flag_table

    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "USAGE.md").read_text()
    assert flag_table() in doc
    docstring = " ".join(FreeKVConfig.__doc__.split())
    for f in dataclasses.fields(FreeKVConfig):
        assert f"{f.name} ({f.metadata['flag']}, default" in docstring and f.metadata["help"] in docstring, f.name
