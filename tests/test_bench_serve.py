"""launch/bench_serve.py without a GPU: options, the flags of each mode, the workloads, the parsing of
bench_serving's output, SGLang's log and /metrics, the report and the JSON record (with a stand-in server and
canned bench_serving results), and one real ``sglang.benchmark.serving`` client run against a fake server."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from launch_scripts import load_launch_script

bs = load_launch_script("bench_serve")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ options
def test_full_defaults_cover_the_issue_grid():
    a = bs.parse_args([])
    assert a.modes == ["dense", "dense-fp8", "freekv", "freekv-skip", "freekv-overlap"]
    assert a.workloads == ["32k", "mixed"] and a.concurrency == [4, 16, 64] and a.output_len == 512
    assert a.input_len == 32000 and (a.mixed_min, a.mixed_max) == (4096, 130048) and a.budget_s is None
    assert a.mixed_max + a.output_len <= 131072
    assert a.locality.startswith("calibrated:") and os.path.isfile(a.locality.split(":", 1)[1])


def test_quick_is_one_workload_two_concurrencies_within_nine_minutes():
    a = bs.parse_args(["--quick"])
    assert a.workloads == ["32k"] and a.concurrency == [4, 16] and a.prompts_per_slot == 1.0
    assert a.budget_s == 540 and a.budget_s + 30 < 600
    assert [bs.num_prompts(c, a.prompts_per_slot, a.min_prompts) for c in a.concurrency] == [4, 16]
    # explicit values win over --quick's
    b = bs.parse_args(["--quick", "--concurrency", "8", "--budget-s", "300"])
    assert b.concurrency == [8] and b.budget_s == 300


def test_bad_options_are_refused():
    for argv in (["--concurrency", "0"], ["--mixed-min", "9000", "--mixed-max", "4000"], ["--host-gb", "lots"],
                 ["--locality", "calibrated", "--query-cosine", "0.9"], ["--locality", "warm"],
                 ["--modes", "sparse"]):
        with pytest.raises(SystemExit):
            bs.parse_args(argv)


def test_full_run_estimate_is_documented_and_quick_fits_its_budget():
    full = bs.estimate_seconds(bs.parse_args([]))
    assert 60 * 60 <= full <= 2 * 60 * 60  # the docstring's "about 1.5-2 hours"
    quick_two = bs.estimate_seconds(bs.parse_args(["--quick", "--modes", "dense", "freekv"]))
    assert quick_two <= 540
    assert "1.5-2 hours" in bs.__doc__ and "9 minutes" in bs.__doc__


# ------------------------------------------------------------------------------------------------ modes
def test_mode_table_flags():
    a = bs.parse_args(["--host-gb", "70", "--freekv-args", "--freekv-kv-storage fp8_e4m3",
                       "--server-args", "--mem-fraction-static 0.8"])
    args = {m: bs.server_args(m, a) for m in bs.MODES}
    env = {m: bs.server_env(m, a) for m in bs.MODES}
    for m in ("dense", "dense-fp8"):
        assert "--kv-retrieval" not in args[m] and args[m][args[m].index("--attention-backend") + 1] == "flashinfer"
        assert "--disable-overlap-schedule" not in args[m] and not env[m]
        assert "--freekv-host-memory-gb" not in args[m] and "--freekv-kv-storage" not in args[m]
    assert "--kv-cache-dtype" not in args["dense"]
    assert args["dense-fp8"][args["dense-fp8"].index("--kv-cache-dtype") + 1] == "fp8_e4m3"
    for m in ("freekv", "freekv-skip", "freekv-overlap"):
        assert args[m][args[m].index("--kv-retrieval") + 1] == "freekv"
        assert args[m][args[m].index("--freekv-host-memory-gb") + 1] == "70"
        assert args[m][args[m].index("--freekv-kv-storage") + 1] == "fp8_e4m3"
        assert env[m]["FREEKV_BENCH_LOCALITY"] == a.locality
    assert args["freekv-skip"][args["freekv-skip"].index("--freekv-recall") + 1] == "skip"
    assert "--freekv-recall" not in args["freekv"] and "--freekv-recall" not in args["freekv-overlap"]
    assert env["freekv-overlap"]["FREEKV_EXPERIMENTAL_OVERLAP_SCHEDULE"] == "1"
    assert "FREEKV_EXPERIMENTAL_OVERLAP_SCHEDULE" not in env["freekv"]
    for m, v in args.items():
        assert v[:4] == ["--model-path", a.model, "--load-format", "dummy"] and "--enable-metrics" in v
        assert v[v.index("--max-running-requests") + 1] == "64" and v[-2:] == ["--mem-fraction-static", "0.8"]


def test_locality_choices_reach_the_freekv_servers():
    cos = bs.server_env("freekv", bs.parse_args(["--query-cosine", "0.95"]))
    assert cos["FREEKV_BENCH_QUERY_COSINE"] == "0.95" and "FREEKV_BENCH_LOCALITY" not in cos
    none = bs.server_env("freekv", bs.parse_args(["--locality", "none"]))
    assert "FREEKV_BENCH_LOCALITY" not in none and "FREEKV_BENCH_QUERY_COSINE" not in none
    assert "calibrated" in bs.locality_label(bs.parse_args([]))
    assert "0.95" in bs.locality_label(bs.parse_args(["--query-cosine", "0.95"]))


# ------------------------------------------------------------------------------------------------ workloads
def test_mixed_lengths_are_seeded_log_uniform_within_bounds():
    xs = bs.mixed_lengths(4000, 4096, 130048, seed=3)
    assert xs == bs.mixed_lengths(4000, 4096, 130048, seed=3) and xs != bs.mixed_lengths(4000, 4096, 130048, 4)
    assert min(xs) >= 4096 and max(xs) <= 130048
    below_16k = sum(x < 16384 for x in xs) / len(xs)
    assert abs(below_16k - math.log(4) / math.log(130048 / 4096)) < 0.03  # equal share per octave
    assert sum(x > 65536 for x in xs) / len(xs) > 0.15


def test_every_mode_gets_the_same_prompts_per_cell():
    a = bs.parse_args([])
    assert bs.prompt_lengths(a, "32k", 16) == [32000] * 32
    assert bs.prompt_lengths(a, "mixed", 16) == bs.prompt_lengths(a, "mixed", 16)
    assert bs.prompt_lengths(a, "mixed", 16) != bs.prompt_lengths(a, "mixed", 64)[:32]
    assert bs.cell_seed(a, "32k", 4) != bs.cell_seed(a, "mixed", 4)


def test_client_command_is_bench_serving_with_fixed_lengths_and_ids():
    a = bs.parse_args(["--port", "31000"])
    cmd = bs.client_command(a, "32k", 16, "/tmp/o.jsonl", None)
    i = cmd.index("--")
    assert cmd[i - 1] == "--client" and "--lengths" not in cmd
    rest = cmd[i + 1:]

    def opt(name):
        return rest[rest.index(name) + 1]

    assert opt("--dataset-name") == "random-ids" and "--tokenize-prompt" in rest
    assert (opt("--random-input-len"), opt("--random-output-len"), opt("--random-range-ratio")) == ("32000", "512", "1")
    assert (opt("--num-prompts"), opt("--max-concurrency"), opt("--port")) == ("32", "16", "31000")
    assert opt("--output-file") == "/tmp/o.jsonl" and "--output-details" in rest
    assert opt("--warmup-requests") == "0" and "--flush-cache" not in rest  # flushed before each cell instead
    mixed = bs.client_command(a, "mixed", 4, "/tmp/m.jsonl", "/tmp/l.json")
    assert mixed[mixed.index("--lengths") + 1] == "/tmp/l.json"


# ------------------------------------------------------------------------------------------------ parsing
BENCH_LINE = {"completed": 15, "duration": 40.0, "total_input_tokens": 480000, "total_output_tokens": 7680,
              "request_throughput": 0.375, "output_throughput": 192.0, "total_throughput": 12192.0,
              "median_ttft_ms": 2100.0, "p99_ttft_ms": 9000.0, "mean_ttft_ms": 3000.0, "median_itl_ms": 21.5,
              "p99_itl_ms": 80.0, "mean_itl_ms": 25.0, "median_tpot_ms": 22.0, "p99_tpot_ms": 30.0,
              "median_e2e_latency_ms": 14000.0, "p99_e2e_latency_ms": 30000.0, "max_concurrent_requests": 16,
              "concurrency": 12.0, "max_output_tokens_per_s": 400.0,
              "errors": [""] * 15 + ["Traceback (most recent call last):\n  ...\nClientPayloadError: closed"],
              "itls": [[0.02] * 511] * 16, "generated_texts": ["x"] * 16}


def test_bench_result_keeps_the_figures_and_counts_failures(tmp_path):
    f = tmp_path / "b.jsonl"
    f.write_text(json.dumps({"completed": 1}) + "\n" + json.dumps(BENCH_LINE) + "\n")
    r = bs.read_bench_result(str(f))
    assert r["output_throughput"] == 192.0 and r["median_itl_ms"] == 21.5 and r["p99_ttft_ms"] == 9000.0
    assert r["failed"] == 1 and r["error_samples"] == ["ClientPayloadError: closed"]
    assert "itls" not in r and "generated_texts" not in r
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(ValueError):
        bs.read_bench_result(str(tmp_path / "e.jsonl"))


LOG = """[2026-12-08 10:00:00] Prefill batch, #new-seq: 1, #new-token: 8192, #cached-token: 0, #running-req: 3, #queue-req: 9,
[2026-12-08 10:00:01] Decode batch, #running-req: 13, #token: 416000, token usage: 0.99, cuda graph: True, gen throughput (token/s): 600.10, #queue-req: 51
[2026-12-08 10:00:02] Decode batch, #running-req: 12, #token: 390000, token usage: 0.95, cuda graph: True, gen throughput (token/s): 590.00, #queue-req: 40
[2026-12-08 10:00:03] Decode batch [812], #running-req: 4, #token: 128000, token usage: 0.31, cuda graph: True, gen throughput (token/s): 200.00, #queue-req: 0
"""


def test_decoding_at_once_reads_the_decode_lines_only():
    d = bs.decoding_at_once(LOG)
    assert d == {"max": 13, "median": 12, "lines": 3, "queue_max": 51}
    assert bs.decoding_at_once("nothing here")["max"] is None


METRICS = """# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{engine_type="unified",model_name="m",priority="",tp_rank="0"} 12.0
sglang:num_running_reqs{engine_type="unified",model_name="m",priority="1",tp_rank="0"} 12.0
sglang:num_queue_reqs{engine_type="unified",model_name="m",priority="",tp_rank="0"} 40.0
sglang:freekv_correction_checks_total{model_name="m",tp_rank="0"} 1000.0
sglang:freekv_corrected_heads_total{model_name="m",tp_rank="0"} 830.0
sglang:freekv_decode_request_steps_total{mode="sparse",model_name="m",tp_rank="0"} 4.0
sglang:freekv_decode_request_steps_total{mode="dense",model_name="m",tp_rank="0"} 0.0
sglang:freekv_recalled_bytes_total{path="speculative",model_name="m",tp_rank="0"} 41943040.0
sglang:freekv_recalled_bytes_total{path="critical",model_name="m",tp_rank="0"} 8388608.0
"""


def test_metrics_totals_and_the_freekv_delta_over_a_cell():
    assert bs.metric(METRICS, "sglang:num_running_reqs") == 12.0  # per-priority line left out
    assert bs.metric(METRICS, "sglang:freekv_recalled_bytes_total", path="critical") == 8388608.0
    assert bs.metric(METRICS, "sglang:absent") is None
    before = bs.freekv_counters("")
    d = bs.freekv_delta(before, bs.freekv_counters(METRICS))
    assert d["corrected_share"] == pytest.approx(0.83) and d["request_steps"] == 4
    assert d["recall_mib_per_request_step"] == {"speculative": 10.0, "critical": 2.0}
    assert bs.freekv_delta(before, bs.freekv_counters("")) is None  # dense: no FreeKV counters


# ------------------------------------------------------------------------------------------------ report
def _cell(mode, workload, c, tput, **extra):
    bench = {**{k: BENCH_LINE[k] for k in bs.BENCH_KEYS}, "output_throughput": tput, "failed": 0,
             "error_samples": []}
    rec = {"mode": mode, "workload": workload, "concurrency": c, "num_prompts": 2 * c, "bench": bench,
           "decoding": {"max": min(c, 13), "median": min(c, 12), "lines": 9, "queue_max": max(0, c - 13),
                        "metrics_running_max": None, "metrics_queue_max": None},
           "freekv": None, "card": "NVIDIA H100 80GB HBM3 (81559 MiB, driver 580.159.04)", "commit": "abc1234"}
    rec.update(extra)
    return rec


PROV = {"card": "NVIDIA H100 80GB HBM3 (81559 MiB, driver 580.159.04)", "commit": "abc1234",
        "host": {"cpus": 16, "ram_gib": 125.8}, "versions": {"torch": "2.11.0+cu130", "sglang": "0.5.17"},
        "command": "python launch/bench_serve.py --quick"}


def test_report_tables_ratios_and_missing_cells():
    a = bs.parse_args(["--concurrency", "4", "64", "--host-gb", "70"])
    fk = {"corrected_share": 0.8, "recall_mib_per_request_step": {"speculative": 3.0, "critical": 20.0}}
    rows = [_cell("dense", "32k", 4, 300.0), _cell("dense-fp8", "32k", 4, 310.0),
            _cell("freekv", "32k", 4, 315.0, freekv=fk), _cell("dense", "32k", 64, 400.0),
            _cell("dense-fp8", "32k", 64, 500.0), _cell("freekv", "32k", 64, 1000.0, freekv=fk),
            {"mode": "freekv-skip", "workload": "32k", "concurrency": 64, "error": "RuntimeError: server exited"},
            {"mode": "freekv-overlap", "workload": "32k", "concurrency": 64, "not_run": "budget"},
            _cell("dense", "mixed", 4, 200.0), _cell("freekv", "mixed", 4, 150.0, freekv=fk)]
    text = bs.report(rows, a, PROV)
    assert "commit abc1234" in text and "NVIDIA H100 80GB HBM3" in text and "125.8 GiB RAM" in text
    assert "python launch/bench_serve.py --quick" in text and "calibrated" in text and "host tier 70 GiB" in text
    assert "| freekv | 64 | 128 | 1000 | 2.50x | 2.00x |" in text
    assert "| freekv | 4 | 8 | 315 | 1.05x | 1.02x |" in text
    assert "| dense | 64 | 128 | 400 | 1.00x | 0.80x |" in text
    assert "2100 / 9000" in text and "21.5 / 80.0" in text and "13 (12)" in text and "80.0%" in text
    assert "3.0 / 20.0" in text
    assert "RuntimeError: server exited" in text and "not run (budget)" in text
    assert "| freekv | 4 | 8 | 150 | 0.75x | - |" in text  # mixed: no dense-fp8 cell
    assert "different cards" not in text
    other = rows + [_cell("dense", "mixed", 64, 1.0, card="NVIDIA H200")]
    assert "different cards" in bs.report(other, a, PROV)


def test_plot_or_a_message(tmp_path):
    a = bs.parse_args(["--concurrency", "4", "64"])
    msg = bs.plot([_cell("dense", "32k", 4, 300.0), _cell("dense", "32k", 64, 400.0)], a, PROV,
                  str(tmp_path / "p.png"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in msg
    else:
        assert (tmp_path / "p.png").exists()


# ------------------------------------------------------------------------------------------------ driver
class FakeProcServer:
    """Stands in for :class:`freekv_sglang.serving.Server`: no process, a log file, canned /metrics."""

    started: list = []

    def __init__(self, args, port, log_path, start_timeout, env):
        self.args, self.port, self.log_path, self.env, self.proc = args, port, log_path, env, None
        self.base = f"http://127.0.0.1:{port}"

    def __enter__(self):
        FakeProcServer.started.append(self)
        Path(self.log_path).write_text("$ server\n")
        return self

    def __exit__(self, *exc):
        pass

    def metrics(self):  # FreeKV's counters: zero at the first read (before the cell), METRICS after
        self.reads = getattr(self, "reads", 0) + 1
        return METRICS if "--kv-retrieval" in self.args and self.reads > 1 else ""

    def generate(self, *args, **kwargs):
        return {}


def fake_bench_serving(per_mode_tput: dict):
    """A ``subprocess.run`` that answers a client command with a canned bench_serving line (by the server's mode,
    read from the port's server) and adds decode lines to the server's log."""

    def run(cmd, stdout=None, stderr=None, timeout=None):
        srv = FakeProcServer.started[-1]
        out = cmd[cmd.index("--output-file") + 1]
        n = int(cmd[cmd.index("--num-prompts") + 1])
        mode = next(m for m, t in per_mode_tput.items() if bs.server_args(m, ARGS) == srv.args)
        line = {**BENCH_LINE, "completed": n, "output_throughput": per_mode_tput[mode], "errors": [""] * n}
        with open(out, "a") as f:
            f.write(json.dumps(line) + "\n")
        with open(srv.log_path, "a") as f:
            f.write(LOG)

        class Done:
            returncode = 0

        return Done()

    return run


ARGS = None


def test_main_writes_cells_json_with_provenance_and_resumes(tmp_path, monkeypatch, capsys):
    global ARGS
    out = tmp_path / "out"
    argv = ["--modes", "dense", "freekv", "--workloads", "32k", "--concurrency", "4", "--host-gb", "20",
            "--commit", "abc1234", "--out", str(out)]
    ARGS = bs.parse_args(argv)
    monkeypatch.setattr(bs, "Server", FakeProcServer)
    monkeypatch.setattr(bs, "flush_cache", lambda srv: None)
    monkeypatch.setattr(bs.subprocess, "run", fake_bench_serving({"dense": 200.0, "freekv": 300.0}))
    import freekv_sglang.provenance as prov

    monkeypatch.setattr(prov, "card", lambda: "NVIDIA H100 80GB HBM3 (81559 MiB, driver 580.159.04)")
    FakeProcServer.started = []
    assert bs.main(argv) == 0
    rec = json.loads((out / "bench_serve.json").read_text())
    assert rec["commit"] == "abc1234" and rec["card"].startswith("NVIDIA H100")
    assert rec["command"] == "python launch/bench_serve.py " + " ".join(argv)
    assert {"torch", "sglang", "flashinfer-python", "triton", "freekv-sglang"} <= set(rec["versions"])
    assert rec["host"]["ram_gib"] > 0 and rec["modes"]["freekv"].startswith("FreeKV")
    cells = {r["mode"]: r for r in rec["results"]}
    assert cells["dense"]["bench"]["output_throughput"] == 200.0 and cells["dense"]["freekv"] is None
    assert cells["freekv"]["freekv"]["corrected_share"] == pytest.approx(0.83)
    assert cells["freekv"]["decoding"]["max"] == 13 and cells["freekv"]["card"].startswith("NVIDIA H100")
    assert "--dataset-name random-ids" in cells["freekv"]["client_command"]
    assert (out / "cells" / "freekv--32k--c4.json").exists() and (out / "bench_serve.md").exists()
    assert "| freekv | 4 | 8 | 300 | 1.50x | - |" in capsys.readouterr().out
    # a second invocation with the same --out keeps the measured cells and starts no server
    FakeProcServer.started = []
    assert bs.main(argv) == 0 and FakeProcServer.started == []
    assert len(json.loads((out / "bench_serve.json").read_text())["results"]) == 2


def test_budget_too_small_starts_no_server(tmp_path, monkeypatch):
    argv = ["--quick", "--budget-s", "100", "--modes", "dense", "--out", str(tmp_path)]
    monkeypatch.setattr(bs, "Server", FakeProcServer)
    FakeProcServer.started = []
    assert bs.main(argv) == 0 and FakeProcServer.started == []
    rows = json.loads((tmp_path / "bench_serve.json").read_text())["results"]
    assert [r["not_run"] for r in rows] == ["budget", "budget"]


def test_a_server_that_fails_to_start_is_reported(tmp_path, monkeypatch):
    class Broken(FakeProcServer):
        def __enter__(self):
            raise RuntimeError("server exited with 1 before becoming healthy")

    monkeypatch.setattr(bs, "Server", Broken)
    assert bs.main(["--modes", "dense", "--workloads", "32k", "--concurrency", "4", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_serve.json").read_text())["results"]
    assert "before becoming healthy" in rows[0]["error"]
    assert "before becoming healthy" in (tmp_path / "bench_serve.md").read_text()


# ------------------------------------------------------------------------------------------------ real client
class FakeSGLang(ThreadingHTTPServer):
    """Enough of SGLang's HTTP API for bench_serving: /v1/models, /server_info, /flush_cache, a streaming
    /generate (one token a millisecond), /metrics; decode lines go to a log file."""

    daemon_threads = True

    def __init__(self, port: int, log_path: str, model: str):
        super().__init__(("127.0.0.1", port), FakeHandler)
        self.log_path, self.model = log_path, model
        self.lock, self.running, self.tokens, self.prompt_lens = threading.Lock(), 0, 0, []
        self.flushes, self.refuse_flushes = 0, 0


class FakeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, body: bytes, ctype="application/json"):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        s = self.server
        if self.path.startswith("/v1/models"):
            return self.reply(json.dumps({"data": [{"id": s.model}]}).encode())
        if self.path.startswith("/metrics"):
            with s.lock:
                text = (f'sglang:num_running_reqs{{model_name="m",priority=""}} {s.running}\n'
                        f'sglang:num_queue_reqs{{model_name="m",priority=""}} 0\n'
                        f'sglang:freekv_correction_checks_total{{model_name="m"}} {10 * s.tokens}\n'
                        f'sglang:freekv_corrected_heads_total{{model_name="m"}} {7 * s.tokens}\n'
                        f'sglang:freekv_decode_request_steps_total{{mode="sparse"}} {s.tokens}\n'
                        f'sglang:freekv_recalled_bytes_total{{path="speculative"}} {2 * 2**20 * s.tokens}\n'
                        f'sglang:freekv_recalled_bytes_total{{path="critical"}} {2**20 * s.tokens}\n')
            return self.reply(text.encode(), "text/plain")
        if self.path.startswith(("/server_info", "/get_server_info")):
            return self.reply(json.dumps({"model_path": s.model}).encode())
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        s = self.server
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path.startswith("/flush_cache"):
            with s.lock:
                s.flushes += 1
                refuse = s.flushes <= s.refuse_flushes
            if refuse:  # as SGLang answers while requests are pending
                self.send_response(400)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            return self.reply(b"Cache flushed.", "text/plain")
        if not self.path.startswith("/generate"):
            return self.reply(b"{}")
        n = body["sampling_params"]["max_new_tokens"]
        with s.lock:
            s.running += 1
            s.prompt_lens.append(len(body["input_ids"]))
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for i in range(1, n + 1):
                time.sleep(0.001)
                chunk = {"text": " t" * i, "meta_info": {"completion_tokens": i, "prompt_tokens": 1}}
                self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.flush()
                with s.lock:
                    s.tokens += 1
                    with open(s.log_path, "a") as f:
                        f.write(f"Decode batch, #running-req: {s.running}, #token: 1, token usage: 0.01, "
                                f"cuda graph: True, gen throughput (token/s): 1.00, #queue-req: 0\n")
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True
        finally:
            with s.lock:
                s.running -= 1


class FakeHttpServer(FakeProcServer):
    """:class:`FakeProcServer` that serves :class:`FakeSGLang` on its port while open."""

    def __enter__(self):
        super().__enter__()
        self.http = FakeSGLang(self.port, self.log_path, self.args[1])
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.http.shutdown()
        self.http.server_close()

    def metrics(self):
        import urllib.request

        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as r:
            return r.read().decode()


def test_sglang_bench_serving_client_against_a_fake_server(tmp_path, monkeypatch):
    """The real ``sglang.benchmark.serving`` client (this script's --client entry, both workloads) against a fake
    SGLang: prompt lengths as asked, every request completed, the figures and the FreeKV counters read back."""
    from freekv_sglang.testing.shape_models import write_shape_model

    model = str(write_shape_model(tmp_path / "model"))
    out = tmp_path / "out"
    argv = ["--model", model, "--modes", "freekv", "--workloads", "32k", "mixed", "--concurrency", "2",
            "--prompts-per-slot", "2", "--input-len", "48", "--output-len", "6", "--mixed-min", "16",
            "--mixed-max", "96", "--port", str(free_port()), "--host-gb", "4", "--cell-timeout", "240",
            "--commit", "abc1234", "--out", str(out)]
    monkeypatch.setattr(bs, "Server", FakeHttpServer)
    FakeProcServer.started = []
    assert bs.main(argv) == 0
    srv = FakeProcServer.started[-1]
    rows = {r["workload"]: r for r in json.loads((out / "bench_serve.json").read_text())["results"]}
    for w, r in rows.items():
        assert "error" not in r, (r.get("error"), (out / "cells" / f"freekv--{w}--c2.client.log").read_text()[-3000:])
        b = r["bench"]
        assert b["completed"] == 4 and b["failed"] == 0 and b["total_output_tokens"] == 24
        assert b["output_throughput"] > 0 and b["median_itl_ms"] > 0 and b["median_ttft_ms"] > 0
        assert 1 <= r["decoding"]["max"] <= 2 and r["decoding"]["metrics_running_max"] is not None
        assert r["freekv"]["corrected_share"] == pytest.approx(0.7)
        assert r["freekv"]["recall_mib_per_request_step"]["speculative"] == pytest.approx(2.0)
    # prompts as asked (warm-ups and bench_serving's own warm-up request included in what the server saw)
    assert srv.http.prompt_lens.count(48) >= 4
    mixed = bs.prompt_lengths(bs.parse_args(argv), "mixed", 2)
    assert all(n in srv.http.prompt_lens for n in mixed) and rows["mixed"]["bench"]["total_input_tokens"] == sum(mixed)


def test_flush_is_retried_while_sglang_refuses_it(tmp_path, monkeypatch):
    monkeypatch.setattr(bs.time, "sleep", lambda s: None)
    srv = FakeHttpServer(["--model-path", "m"], free_port(), str(tmp_path / "log"), 10, {})
    with srv:
        srv.http.refuse_flushes = 2
        bs.flush_cache(srv)
        assert srv.http.flushes == 3
        srv.http.flushes, srv.http.refuse_flushes = 0, 100
        with pytest.raises(urllib.error.HTTPError):
            bs.flush_cache(srv, tries=3)
        assert srv.http.flushes == 3


def test_benchmarks_script_has_a_serve_section_bench_serve_accepts():
    import re
    import shlex

    text = (Path(__file__).resolve().parents[1] / "launch" / "benchmarks.sh").read_text()
    line = next(x for x in text.splitlines() if x.strip().startswith("serve) run serve"))
    cmd = line.split("launch/bench_serve.py", 1)[1].rsplit(";;", 1)[0]
    cmd = re.sub(r'"\$(\w+)"', lambda m: {"MODEL": "m", "LOCALITY": "calibrated", "OUT": "o"}[m.group(1)], cmd)
    a = bs.parse_args(shlex.split(cmd))
    assert a.model == "m" and a.locality.startswith("calibrated:") and a.modes == list(bs.MODES)
    assert "serve)" in text and "sections=(kernels decode32k long capacity overlap qwen)" in text  # not by default
