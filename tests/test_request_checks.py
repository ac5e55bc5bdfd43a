"""Bad input (issue 28): what SGLang 0.5.17's own front end answers, and what FreeKV's request checks add.

The last tests send the soak's whole bad-input catalogue (and a few more) through SGLang's real HTTP app, tokenizer
manager and OpenAI handlers on the CPU, with a stand-in for the scheduler (tests/sglang_frontend.py): stock, with
the plugin's tokenizer-side check, and with only the scheduler-side check on a real ``Req``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from array import array
from pathlib import Path
from types import SimpleNamespace

import pytest

from freekv_sglang import compat, request_checks
from freekv_sglang.config import ENV_VAR, FreeKVConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import soak  # noqa: E402

VOCAB = 49152


# ------------------------------------------------------------------------------------------------ the checks
@pytest.mark.parametrize("ids, bad", [
    ([0, 1, VOCAB - 1], None),
    ([], None),
    (None, None),
    ([5, VOCAB], "input_ids[1] = 49152"),
    ([-1, 5], "input_ids[0] = -1"),
    ([5, 2**40, -3], "input_ids[1] = 1099511627776 is outside the model's vocabulary [0, 49152) (2 of the 3 ids"),
    (array("q", [7, VOCAB + 1000]), "input_ids[1] = 50152"),  # the scheduler's Req holds an array
])
def test_out_of_vocab(ids, bad):
    why = request_checks.out_of_vocab(ids, VOCAB)
    assert why is None if bad is None else bad in why


def test_sampling_params_problem_names_the_field():
    from sglang.srt.sampling.sampling_params import SamplingParams

    fields = request_checks._sampling_fields(compat.resolve(compat.SAMPLING_PARAMS))
    assert fields is not None and {"max_new_tokens", "temperature", "stop", "n", "ignore_eos"} <= set(fields)
    for key in request_checks.NUMERIC_SAMPLING_PARAMS:
        assert key in fields
        why = request_checks.sampling_params_problem({key: "many"}, fields)
        assert why == f"sampling_params.{key} must be a number, got 'many'"
        with pytest.raises(TypeError):  # what SGLang itself does with it: no message for the client
            SamplingParams(**{key: "many"}).verify(VOCAB)
    assert request_checks.sampling_params_problem({"max_new_tokenz": 8}, fields) == (
        "unknown sampling parameter: 'max_new_tokenz'")
    with pytest.raises(TypeError):
        SamplingParams(max_new_tokenz=8)
    ok = {"max_new_tokens": 8, "temperature": 0.7, "top_p": 0.95, "stop": ["x"], "n": 2, "ignore_eos": True,
          "top_k": None, "min_new_tokens": 0}
    assert request_checks.sampling_params_problem(ok, fields) is None
    # ranges are SGLang's to check (it answers them with a 400 and a message)
    assert request_checks.sampling_params_problem({"max_new_tokens": -1, "temperature": -1.0}, fields) is None
    assert request_checks.sampling_params_problem(None) is None


# --------------------------------------------------------------------------------- the tokenizer-side hook
def _tokenizer_manager(enabled: bool):
    cfg = FreeKVConfig(enabled=enabled, host_memory_gb=1)
    sa = SimpleNamespace(**{compat.SERVER_ARGS_ATTR: cfg})
    return SimpleNamespace(server_args=sa, model_config=SimpleNamespace(vocab_size=VOCAB),
                           sampling_params_class=compat.resolve(compat.SAMPLING_PARAMS))


def _generate(**sp):
    return SimpleNamespace(sampling_params=dict(sp), contains_mm_input=lambda: False)


def test_the_tokenizer_hook_refuses_on_freekv_servers_only(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    calls = []

    def orig(tm, obj, ids):
        calls.append(list(ids))

    on, off = _tokenizer_manager(True), _tokenizer_manager(False)
    request_checks.around_validate_one_request(orig, on, _generate(max_new_tokens=8), [1, 2])
    request_checks.around_validate_one_request(orig, off, _generate(max_new_tokens="x"), [1, VOCAB])  # stock
    assert calls == [[1, 2], [1, VOCAB]]
    with pytest.raises(ValueError, match=r"input_ids\[1\] = 49152 is outside"):
        request_checks.around_validate_one_request(orig, on, _generate(max_new_tokens=8), [1, VOCAB])
    with pytest.raises(ValueError, match="sampling_params.max_new_tokens must be a number"):
        request_checks.around_validate_one_request(orig, on, _generate(max_new_tokens="x"), [1, 2])
    assert len(calls) == 2  # refused before SGLang's own checks
    # a multimodal prompt carries its processor's placeholder ids: left to SGLang
    mm = SimpleNamespace(sampling_params={}, contains_mm_input=lambda: True)
    request_checks.around_validate_one_request(orig, on, mm, [1, VOCAB + 5])
    assert calls[-1] == [1, VOCAB + 5]


def test_the_tokenizer_hook_reads_the_exported_config(monkeypatch):
    """Where the ServerArgs carry no FreeKV config (a process that got them another way), the exported one says."""
    tm = _tokenizer_manager(True)
    tm.server_args = SimpleNamespace()
    monkeypatch.setenv(ENV_VAR, FreeKVConfig(enabled=True, host_memory_gb=1).to_json())
    with pytest.raises(ValueError):
        request_checks.around_validate_one_request(lambda *a: None, tm, _generate(), [VOCAB])
    monkeypatch.delenv(ENV_VAR)
    request_checks.around_validate_one_request(lambda *a: None, tm, _generate(), [VOCAB])


# --------------------------------------------------------------------------------- the scheduler-side hook
@pytest.fixture
def req_factory(monkeypatch):
    """Real SGLang requests; ``set_finish_with_abort`` logs on TP rank 0, and there is no TP group here."""
    from sglang.srt.managers import schedule_batch
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    monkeypatch.setattr(schedule_batch, "get_parallel", lambda: SimpleNamespace(tp_rank=0))
    return lambda ids: Req("r", "", array("q", ids), SamplingParams(max_new_tokens=8), vocab_size=VOCAB)


def test_the_scheduler_hook_ends_the_request_with_sglangs_abort(req_factory):
    sched = SimpleNamespace(model_config=SimpleNamespace(vocab_size=VOCAB))
    good, bad = req_factory([1, 2, 3]), req_factory([1, VOCAB, 3])
    assert request_checks.before_add_request_to_queue(sched, good) is None
    assert good.to_finish is None and list(good.origin_input_ids) == [1, 2, 3]
    assert request_checks.before_add_request_to_queue(sched, bad) is None
    fin = bad.to_finish.to_json()
    assert fin["type"] == "abort" and fin["status_code"] == 400 and "input_ids[1] = 49152 is outside" in fin["message"]
    assert list(bad.origin_input_ids) == [0]  # SGLang's one-token prefill of a refused request: in the vocabulary
    # requests SGLang already ends, retracted ones (checked on arrival), multimodal ones are left alone
    for kw, setup in (({"is_retracted": True}, None), ({}, "to_finish"), ({}, "multimodal_inputs")):
        r = req_factory([VOCAB])
        if setup:
            setattr(r, setup, object())
        before = r.to_finish
        request_checks.before_add_request_to_queue(sched, r, **kw)
        assert r.to_finish is before and list(r.origin_input_ids) == [VOCAB]


# ------------------------------------------------------------------------- SGLang's front end, end to end
EXTRA = [
    ("generate: unknown sampling parameter 'foo'", "/generate",
     {"input_ids": [100, 101], "sampling_params": {"max_new_tokens": 8, "foo": 1}}),
    ("generate: batch with one id outside the vocabulary", "/generate",
     {"input_ids": [[100, 101], [100, VOCAB]], "sampling_params": {"max_new_tokens": 8}}),
    ("generate: a valid prompt", "/generate", {"text": "hello", "sampling_params": {"max_new_tokens": 8}}),
]


@pytest.fixture(scope="module")
def frontend():
    """Every catalogue input through SGLang's front end in each mode (one process: ~1 minute)."""
    cat = soak.bad_inputs(VOCAB, 4096)
    cases = [[b.path, b.body.decode("latin-1"), b.content_type] for b in cat]
    cases += [[path, body, "application/json"] for _, path, body in EXTRA]
    names = [b.name for b in cat] + [n for n, _, _ in EXTRA]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop(ENV_VAR, None)
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "sglang_frontend.py"), "stock", "freekv", "scheduler"],
                       input=json.dumps(cases), capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    line = [x for x in p.stdout.splitlines() if x.startswith("FRONTEND-RESULTS ")]
    assert line, p.stdout[-2000:] + p.stderr[-4000:]
    out = json.loads(line[0].split(" ", 1)[1])
    return {mode: dict(zip(names, rows)) for mode, rows in out.items()}, {b.name: b for b in cat}


OOV = ("generate: token id = vocabulary size", "generate (stream): token id = vocabulary size",
       "completions: token id = vocabulary size + 1000", "completions (stream): token id = vocabulary size",
       "generate: negative token id", "generate: token id 2**40")
MISTYPED = ("generate: max_new_tokens 'many'", "generate: temperature 'hot'", "generate: unknown sampling parameter",
            "generate: unknown sampling parameter 'foo'")


def test_stock_sglang_lets_ids_outside_the_vocabulary_reach_the_scheduler(frontend):
    res, _ = frontend
    stock = res["stock"]
    for name in OOV:
        assert stock[name]["reached"] and stock[name]["status"] == 200, name  # on to the embedding
    assert VOCAB in stock["generate: token id = vocabulary size"]["ids"]
    for name in MISTYPED:  # a TypeError in SGLang's checks: a 500 without a message
        assert stock[name]["status"] == 500 and not stock[name]["reached"], name
    # SGLang's own int64 check, before the tokenizer manager
    assert stock["generate: token id 2**63 (beyond int64)"]["status"] == 400
    # n = 0 reaches the scheduler, then SGLang's response builder fails: a 400 with a message
    assert stock["completions: n 0"]["reached"] and stock["completions: n 0"]["status"] == 400
    answered = set(OOV) | set(MISTYPED) | {"chat: empty user message", "completions: n 0", "generate: a valid prompt"}
    for name, r in stock.items():
        if name not in answered and not name.startswith("generate: batch"):
            assert 400 <= r["status"] < 500 and not r["reached"] and soak.error_message(r["text"]), name


@pytest.mark.parametrize("mode", ["freekv", "scheduler"])
def test_every_bad_input_is_answered_with_a_message(frontend, mode):
    res, cat = frontend
    rows = res[mode]
    for name, bad in cat.items():
        r = rows[name]
        verdict, why = soak.judge_bad_input(bad, r["status"], r["text"], "", True, True)
        if mode == "scheduler" and name in MISTYPED:  # only the tokenizer-side check types sampling parameters
            assert r["status"] == 500, name
            continue
        assert verdict == "pass", (name, r["status"], r["text"][:300], why)
    for name in OOV:
        msg = soak.error_message(rows[name]["text"])
        assert "is outside the model's vocabulary [0, 49152)" in msg, (name, msg)
        # the tokenizer-side check answers before the scheduler; the scheduler-side one after a real Req's check
        assert rows[name]["reached"] is (mode == "scheduler"), name
    batch = rows["generate: batch with one id outside the vocabulary"]
    assert batch["status"] == 400 and "outside the model's vocabulary" in soak.error_message(batch["text"])
    assert rows["generate: a valid prompt"]["status"] == 200 and rows["generate: a valid prompt"]["reached"]
    if mode == "freekv":
        for name in MISTYPED:
            assert rows[name]["status"] == 400 and not rows[name]["reached"], name
        assert "'foo'" in soak.error_message(rows["generate: unknown sampling parameter 'foo'"]["text"])
