"""launch/bench_decode.py: mode variants, host-tier sizing and the result table (CPU, no SGLang run)."""

import argparse
import json
import types

import pytest

from launch_scripts import load_launch_script


@pytest.fixture(scope="module")
def bench():
    return load_launch_script("bench_decode")


def test_mode_variants(bench):
    assert bench.parse_mode("freekv") == ("freekv", {})
    assert bench.parse_mode("freekv@32+2") == ("freekv", {"FREEKV_RECALL_PROGRAMS": "32", "FREEKV_RECALL_WARPS": "2"})
    assert bench.parse_mode("sync@16") == ("sync", {"FREEKV_RECALL_PROGRAMS": "16"})
    assert bench.parse_mode("freekv-keep4:flashinfer")[1] == {"FREEKV_DECODE_ATTENTION": "flashinfer"}
    assert bench.parse_mode("freekv-over512%cal")[0] == "freekv-over512"
    for bad in ("dense@16", "freekv@0", "freekv@x", "freekv/1", "quest", "freekv#64", "freekv:cudnn", "freekv:xqa",
                "freekv-over", "freekv-over512-over256", "sync-over512", "freekv-under512"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_mode(bad)


def test_overfetch_and_keep_margin_modes(bench):
    """``freekv-overN`` / ``freekv-keepM`` / both: FreeKV's flags, accepted by the plugin's own config; the
    benchmarks script's over-fetch section names only modes that parse."""
    from pathlib import Path

    from freekv_sglang.cli import add_freekv_arguments
    from freekv_sglang.config import FreeKVConfig

    assert bench.mode_args("freekv-over512") == ["--kv-retrieval", "freekv", "--freekv-overfetch-tokens", "512"]
    assert bench.mode_args("freekv-keep4") == ["--kv-retrieval", "freekv", "--freekv-keep-margin", "4"]
    args = bench.mode_args("freekv-over256-keep2")
    assert args == ["--kv-retrieval", "freekv", "--freekv-overfetch-tokens", "256", "--freekv-keep-margin", "2"]
    parser = argparse.ArgumentParser()
    add_freekv_arguments(parser)
    cfg = FreeKVConfig.from_namespace(parser.parse_args(args + ["--freekv-host-memory-gb", "1"]))
    assert (cfg.overfetch_tokens, cfg.keep_margin) == (256, 2)
    args = bench.mode_args("freekv-grid2-keep4-tau80")
    assert args[2:] == ["--freekv-page-scoring", "grid2", "--freekv-keep-margin", "4",
                        "--freekv-correction-threshold", "0.8"]
    cfg = FreeKVConfig.from_namespace(parser.parse_args(args + ["--freekv-host-memory-gb", "1"]))
    assert (cfg.page_scoring, cfg.keep_margin, cfg.correction_threshold) == ("grid2", 4, 0.8)
    text = (Path(__file__).resolve().parents[1] / "launch" / "benchmarks.sh").read_text()
    line = next(l for l in text.splitlines() if "--modes dense freekv freekv-over" in l)
    modes = line.split("--modes", 1)[1].split("--timeout")[0].split()
    assert [bench.parse_mode(m)[0] for m in modes] == modes and "freekv-over512" in modes


def test_kv_bytes_and_auto_host_tier(bench, tmp_path):
    cfg = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert bench.kv_bytes_per_token(str(tmp_path)) == 32 * 8 * 128 * 2 * 2  # 128 KiB per token, bf16
    small = bench.auto_host_gb(str(tmp_path), [1, 2], [1000], 32)
    assert small == pytest.approx(max(1.0, 2 * 1096 * 131072 * 1.05 / 2**30), abs=0.06)
    # run R's cell: 60 GiB holds 491520 tokens of 128 KiB, 16 x (32000 + 64) do not fit, 8 x do
    assert bench.cells_beyond_host_tier(str(tmp_path), 60, [8, 16], [32000], 64) == [(16, 32000)]
    assert bench.cells_beyond_host_tier(str(tmp_path), 64, [8, 16], [32000], 64) == []
    huge = bench.auto_host_gb(str(tmp_path), [32], [131072], 32)  # 512 GiB needed: capped by the machine
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20
    assert huge <= 0.8 * avail + 0.1


def test_table_lists_skipped_cells_and_memory(bench):
    row = {"input_len": 32000, "batch_size": 4, "median_decode_latency": 0.008, "prefill_latency": 4.7,
           "kv_gpu_gib": 1.5, "kv_gpu_pool_gib": 6.0, "kv_host_gib": 15.6, "freekv_correction_rate": 0.03,
           "freekv_recall_bytes_per_request_step": 27 * 2**20}
    md = bench.table({"freekv": [row]}, [32000, 131072], [4])
    assert "| freekv | 32000 | 4 | 8.00 | 500 | 4.70 | 0.030 | 27.00 | - | 1.50 (6.00) | 15.60 |" in md
    assert "| freekv | 131072 | 4 | skipped" in md
    # with the PCIe ceiling: 4 requests x 27 MiB at 56.6 GB/s = 2.00 ms; transfers-skipped modes move nothing
    md = bench.table({"freekv": [row], "skip": [row]}, [32000], [4], h2d_gbps=4 * 27 * 2**20 / 2e-3 / 1e9)
    assert "| freekv | 32000 | 4 | 8.00 | 500 | 4.70 | 0.030 | 27.00 | 2.00 | 1.50 (6.00) | 15.60 |" in md
    assert "| skip | 32000 | 4 | 8.00 | 500 | 4.70 | 0.030 | 27.00 | - |" in md
    assert md.splitlines()[0].count("|") == md.splitlines()[2].count("|")
    ratios = bench.ratios({"freekv": [row], "freekv@16": [dict(row, median_decode_latency=0.010)]})
    assert "speed-up vs freekv@16" in ratios and "1.25x" in ratios


def test_capacity_table():
    cap = load_launch_script("bench_capacity")
    rows = [{"mode": "dense", "peak_running": 24, "completed": 26, "submitted": 26, "token_capacity": 800000,
             "computed_concurrent": 24},
            {"mode": "freekv", "peak_running": 22, "completed": 24, "submitted": 24, "token_capacity": 720000,
             "computed_concurrent": 22}]
    md = cap.table(rows, 32000)
    assert "| dense | 800000 | 24 | 24 | 26/26 |" in md and "0.92x" in md
    assert "error: boom" in cap.table([{"mode": "freekv", "error": "boom"}], 32000)
    fp8 = [dict(rows[0]), dict(rows[1], mode="freekv-fp8-tier", peak_running=96),
           dict(rows[0], mode="dense-fp8", peak_running=48)]
    md = cap.table(fp8, 32000)
    assert "freekv-fp8-tier / dense concurrent 32000-token requests: 4.00x" in md
    assert "freekv-fp8-tier / dense-fp8 concurrent 32000-token requests: 2.00x" in md


def test_capacity_computed_is_bounded_by_tokens_and_running_requests():
    cap = load_launch_script("bench_capacity")
    assert cap.computed_concurrent(3_743_712, 75, 32_256) == 75  # working sets bound it, not the tiers' tokens
    assert cap.computed_concurrent(915_939, 120, 32_256) == 28
    assert cap.computed_concurrent(915_939, None, 32_256) == 28
    assert cap.computed_concurrent(None, 75, 32_256) is None


def test_capacity_reads_the_schedulers_running_cap(tmp_path):
    cap = load_launch_script("bench_capacity")
    log = tmp_path / "capacity-freekv-tier.log"
    log.write_text("[x] FreeKV memory: ...; max running requests 75\n[x] max_total_num_tokens=3743712, "
                   "chunked_prefill_size=-1, max_prefill_tokens=16384, max_running_requests=75, context_len=131072, "
                   "available_gpu_mem=20.10 GB\n")
    assert cap.scheduler_max_running(str(log)) == 75
    assert cap.scheduler_max_running(str(tmp_path / "none.log")) is None


def test_capacity_reports_why_the_server_died(tmp_path):
    cap = load_launch_script("bench_capacity")
    log = tmp_path / "capacity-freekv.log"
    log.write_text("[x] Prefill batch, #running-req: 98\n[x] Scheduler hit an exception: Traceback (most recent call "
                   "last):\n  File \"s.py\", line 1, in f\n    x.tolist()\ntorch.AcceleratorError: CUDA error: an "
                   "illegal memory access was encountered\nSearch for `cudaErrorIllegalAddress' in the docs\n")
    assert cap.server_failure(str(log)) == "torch.AcceleratorError: CUDA error: an illegal memory access was encountered"
    assert cap.server_failure(str(tmp_path / "missing.log")) is None

    def boom(mode, a):
        raise ConnectionError("Remote end closed connection without response")

    cap.run = boom
    r = cap.run_or_error("freekv", argparse.Namespace(out=str(tmp_path)))
    assert r["error"].startswith("ConnectionError: Remote end closed") and "illegal memory access" in r["error"]


def test_capacity_reads_peak_running_from_sglang_log(tmp_path):
    cap = load_launch_script("bench_capacity")
    log = tmp_path / "server.log"
    log.write_text("[x] Decode batch, #running-req: 7, #token: 1\n[x] Prefill batch, #running-req: 30\n"
                   "[x] Decode batch [120], #running-req: 12, #token: 2\n[x] Decode batch, #running-req: 9\n")
    assert cap.peak_running(str(log)) == 12


def test_cells_are_kept_as_measured(bench, tmp_path):
    """Each measured cell is written at once with its KV memory, so a later cell that fails loses nothing;
    skipped cells (None) are not written."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 4, "num_key_value_heads": 2,
                                                   "hidden_size": 64, "num_hidden_layers": 3}))
    out = tmp_path / "cells.jsonl"

    class Pool:
        def get_kv_size_bytes(self):
            return 2**30, 2**30

    runner = argparse.Namespace(token_to_kv_pool=Pool())
    cells = iter([{"batch_size": 2, "input_len": 100, "output_len": 4}, None])
    wrapped = bench.recording(lambda *a, **k: next(cells), str(out), str(model), lambda: None)
    assert wrapped("dense", runner)["kv_gpu_pool_gib"] == 2.0
    assert wrapped("dense", runner) is None
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["batch_size"] == 2
    assert rows[0]["kv_gpu_gib"] == pytest.approx(2 * 104 * 3 * 2 * 16 * 2 * 2 / 2**30)
    assert rows[0]["kv_host_gib"] == 0.0


def test_dense_pool_holds_the_largest_cell(bench):
    a = argparse.Namespace(batch_sizes=[1, 8, 4], contexts=[8000, 32000], output_len=32)
    assert bench.dense_pool_tokens(a) == 8 * (32000 + 32 + 64)


def test_report_header_names_card_versions_shape_and_command(bench, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 32, "num_attention_heads": 32,
                                                      "num_key_value_heads": 8, "hidden_size": 4096}))
    a = argparse.Namespace(model=str(tmp_path), query_cosine=0.95, output_len=64)
    h = bench.header("NVIDIA H200", a, 55.4, ["--contexts", "32000", "--modes", "dense", "freekv@32"])
    assert h.startswith("card: NVIDIA H200; torch ")
    assert "sglang " in h and "freekv-sglang " in h
    assert "32 layers, 32 query / 8 KV heads, head dim 128" in h
    assert "pinned H2D ceiling 55.4 GB/s" in h and "synthetic consecutive-query cosine 0.95" in h
    assert "command: `python launch/bench_decode.py --contexts 32000 --modes dense freekv@32`" in h


def test_prefill_groups(bench):
    assert bench.prefill_groups([32000] * 16, 262144) == [list(range(8)), list(range(8, 16))]
    assert bench.prefill_groups([32000] * 8, 262144) == [list(range(8))]  # fits: one forward
    assert bench.prefill_groups([32000] * 3, 0) == [[0, 1, 2]]  # 0: whole batch
    assert bench.prefill_groups([5, 20, 5, 5], 10) == [[0], [1], [2, 3]]  # a longer request alone
    groups = bench.prefill_groups([7, 3, 9, 1, 4, 4, 8], 10)
    assert sorted(i for g in groups for i in g) == list(range(7))
    assert all(sum([7, 3, 9, 1, 4, 4, 8][i] for i in g) <= 10 for g in groups)


def test_grouped_extend_merges_groups_into_one_decode_batch(bench):
    torch = pytest.importorskip("torch")

    class Req:
        def __init__(self, n, rid):
            self.origin_input_ids, self.rid = [1] * n, rid

    class Batch:
        def __init__(self, reqs):
            self.reqs = list(reqs)

        def merge_batch(self, other):
            self.reqs += other.reqs

    calls = []

    def extend(reqs, runner):
        calls.append([r.rid for r in reqs])
        return torch.tensor([r.rid for r in reqs]), torch.zeros(len(reqs), 3), Batch(reqs)

    reqs = [Req(100, i) for i in range(5)]
    ids, logits, batch = bench.grouped_extend(extend, 250)(reqs, "runner")
    assert calls == [[0, 1], [2, 3], [4]]
    assert ids.tolist() == [0, 1, 2, 3, 4] and logits is None
    assert [r.rid for r in batch.reqs] == [0, 1, 2, 3, 4]
    calls.clear()
    ids, logits, batch = bench.grouped_extend(extend, 0)(reqs, "runner")  # one forward, untouched result
    assert calls == [[0, 1, 2, 3, 4]] and logits.shape == (5, 3)


def test_warm_up_pass_is_not_a_measured_cell(bench):
    warm = {"input_len": 32000, "batch_size": 1, "output_len": 32, "median_decode_latency": 0.0070}
    first = {"input_len": 32000, "batch_size": 1, "output_len": 64, "median_decode_latency": 0.0065}
    second = {"input_len": 32000, "batch_size": 4, "output_len": 64, "median_decode_latency": 0.0099}
    rows = bench.measured_rows([warm, first, second], 64)
    assert rows == [first, second]
    # a warm-up of the same output length is replaced by the measured row of its cell
    again = dict(first, median_decode_latency=0.0064)
    assert bench.measured_rows([first, again, second], 64) == [again, second]


def test_benchmarks_script_parses_and_refuses_unknown_sections(tmp_path):
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "launch" / "benchmarks.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    r = subprocess.run(["bash", str(script), "everything"], capture_output=True, text=True,
                       env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "unknown section everything" in r.stdout


def test_results_are_published_into_docs_by_card_and_date(bench, tmp_path):
    out, docs = tmp_path / "out", tmp_path / "docs"
    out.mkdir()
    (out / "bench_decode.md").write_text("| table |")
    (out / "bench_decode.json").write_text("{}")
    assert bench.docs_stem("NVIDIA H200", "2026-11-28") == "bench_decode-nvidia-h200-2026-11-28"
    first = bench.publish(str(out), str(docs), "NVIDIA H200")
    second = bench.publish(str(out), str(docs), "NVIDIA H200")
    assert [p.rsplit(".", 1)[1] for p in first] == ["md", "json"]  # no plot was made: none copied
    assert first[0] != second[0] and second[0].endswith("-2.md")
    assert (docs / first[0].rsplit("/", 1)[1]).read_text() == "| table |"


def test_contexts_beyond_the_models_positions_are_refused(bench, tmp_path):
    cfg = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 256,
           "max_position_embeddings": 131072}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = str(tmp_path)
    assert bench.check_contexts(m, [8000, 131072 - 64], 64, []) is None
    why = bench.check_contexts(m, [8000, 131072], 64, [])
    assert "[131072]" in why and "longest context that fits is 131008" in why
    assert bench.check_contexts(m, [8000], 64, ["--context-length", "8000"]) is not None
    assert bench.check_contexts(m, [200000], 64, ["--context-length=262144"]) is None


def test_a_crashed_cell_does_not_take_the_rest_of_the_mode(bench):
    """One-batch runs cells batch-major; after a crash the cells after the failing one get new launches."""
    log = ("skipping (32, 65536, 64) due to max batch size limit\n"
           "skipping (32, 130000, 64) due to max batch size limit\n")
    skipped = bench.skipped_cells(log)
    assert skipped == {(32, 65536), (32, 130000)}
    bs, ctx = [1, 4, 32], [8000, 65536, 130000]
    done = {(1, 8000), (1, 65536)}
    failed, launches = bench.relaunch_plan(bs, ctx, done, skipped)
    assert failed == (1, 130000) and launches == [([4, 32], ctx)]
    failed, launches = bench.relaunch_plan(bs, ctx, {(1, 8000)}, skipped)
    assert failed == (1, 65536) and launches == [([1], [130000]), ([4, 32], ctx)]
    # the cells the launches cover are exactly those after the failed one
    covered = {c for b_, c_ in launches for c in bench.cell_order(b_, c_)}
    order = bench.cell_order(bs, ctx)
    assert covered == set(order[order.index(failed) + 1:])
    assert bench.relaunch_plan(bs, ctx, set(order) - skipped, skipped) == (None, [])
    assert bench.relaunch_plan([4, 32], ctx, set(), skipped)[0] == (4, 8000)  # died in the warm-up


def test_run_mode_relaunches_after_a_crash(bench, tmp_path, monkeypatch):
    """run_mode with a stand-in for the benchmark process: the first launch measures one cell and dies
    in the next; the relaunches measure the rest, and every launch appends to the mode's log."""
    launches = []

    def fake_run(cmd, stdout, stderr, timeout, env):
        argv = cmd[cmd.index("--worker") + 1:]
        bs = [int(x) for x in argv[argv.index("--batch-size") + 1:argv.index("--input-len")]]
        ctx = [int(x) for x in argv[argv.index("--input-len") + 1:argv.index("--model-path")]]
        res = argv[argv.index("--result-filename") + 1]
        launches.append((bs, ctx))
        stdout.write(f"launch {len(launches)}\n")
        rc = 0
        with open(res, "a") as f:
            for b, c in bench.cell_order(bs, ctx):
                if (b, c) == (1, 65536):
                    rc = 1  # a device-side assert in this cell
                    break
                f.write(json.dumps({"batch_size": b, "input_len": c, "output_len": 64,
                                    "median_decode_latency": 0.01}) + "\n")
        return types.SimpleNamespace(returncode=rc)

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    a = argparse.Namespace(model="m", output_len=64, batch_sizes=[1, 4], contexts=[8000, 65536, 130000], extra=[],
                           host_gb=10.0, prefill_tokens_per_forward=0, query_cosine=None, timeout=10, relaunches=3)
    rows = bench.run_mode("freekv", a, str(tmp_path))
    assert launches == [([1, 4], [8000, 65536, 130000]), ([1], [130000]), ([4], [8000, 65536, 130000])]
    assert sorted((r["batch_size"], r["input_len"]) for r in rows) == [(1, 8000), (1, 130000), (4, 8000),
                                                                        (4, 65536), (4, 130000)]
    log = (tmp_path / "one_batch-freekv.log").read_text()
    assert log.count("args: ") == 3 and "launch 3" in log
    a.relaunches = 0
    launches.clear()
    assert len(bench.run_mode("freekv", a, str(tmp_path))) == 1 and len(launches) == 1


def test_rounds_report_the_median_round_and_the_spread(bench):
    def row(ms, c=32000, b=1, **kw):
        return {"input_len": c, "batch_size": b, "median_decode_latency": ms / 1000, **kw}

    rounds = [{"freekv": [row(6.8, tag=1), row(13.0, b=8)], "freekv:triton": [row(7.3)]},
              {"freekv": [row(6.6, tag=2), row(12.9, b=8)], "freekv:triton": [row(6.0)]},
              {"freekv": [row(6.7, tag=3)], "freekv:triton": []}]
    merged = bench.merge_rounds(rounds)
    fk = {(r["input_len"], r["batch_size"]): r for r in merged["freekv"]}
    assert fk[(32000, 1)]["tag"] == 3 and fk[(32000, 1)]["decode_ms_rounds"] == pytest.approx([6.8, 6.6, 6.7])
    # two timed rounds: the lower middle (the faster) one; a round without the cell shows as missing
    assert fk[(32000, 8)]["median_decode_latency"] == pytest.approx(0.0129)
    assert fk[(32000, 8)]["decode_ms_rounds"][2] is None
    tri = merged["freekv:triton"][0]
    assert tri["median_decode_latency"] == pytest.approx(0.006)
    md = bench.spread_table(merged)
    assert "| freekv | 32000 | 1 | 6.80, 6.60, 6.70 | 1.030x |" in md
    assert "| freekv | 32000 | 8 | 13.00, 12.90, - | 1.008x |" in md
    assert "| freekv:triton | 32000 | 1 | 7.30, 6.00, - | 1.217x |" in md
    assert md.splitlines()[0].count("|") == md.splitlines()[2].count("|")
    # the merged rows feed the main table and the ratios like a single round's
    assert "speed-up vs freekv:triton" in bench.ratios(merged)


def test_main_runs_the_modes_in_interleaved_rounds(bench, tmp_path, monkeypatch, capsys):
    order = []

    def fake_run_mode(mode, a, out_dir):
        order.append((mode, out_dir))
        ms = {"dense": 7.0, "freekv": 6.0 + 0.5 * (len(order) > 2)}[mode]
        return [{"input_len": 32000, "batch_size": 1, "median_decode_latency": ms / 1000, "prefill_latency": 1.0}]

    monkeypatch.setattr(bench, "run_mode", fake_run_mode)
    monkeypatch.setattr(bench, "h2d_ceiling_gbps", lambda: None)
    out = tmp_path / "o"
    monkeypatch.setattr("sys.argv", ["bench_decode.py", "--model", str(tmp_path / "none"), "--host-gb", "4",
                                     "--batch-sizes", "1", "--modes", "dense", "freekv", "--rounds", "2",
                                     "--out", str(out)])
    bench.main()
    assert [m for m, _ in order] == ["dense", "freekv", "dense", "freekv"]
    assert [d for _, d in order] == [str(out / "round1")] * 2 + [str(out / "round2")] * 2
    res = json.loads((out / "bench_decode.json").read_text())
    assert len(res["rounds"]) == 2 and res["results"]["freekv"][0]["decode_ms_rounds"] == pytest.approx([6.0, 6.5])
    text = capsys.readouterr().out
    assert "| freekv | 32000 | 1 | 6.00, 6.50 | 1.083x |" in text and "speed-up vs dense" in text
    monkeypatch.setattr("sys.argv", ["bench_decode.py", "--host-gb", "4", "--rounds", "0", "--out", str(out)])
    with pytest.raises(SystemExit):
        bench.main()
