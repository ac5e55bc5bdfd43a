"""FreeKV under SGLang's overlap scheduler (CPU): why the scheduler's writes of ``req_to_token`` must wait for
the whole previous forward, and that the runtime hooks make them do so (docs/DESIGN.md, "Under the overlap
scheduler"; the served comparison is ``tests/gpu/test_server_overlap.py``).

- SGLang 0.5.17's decode CUDA-graph runner records the read-done event of its write-after-read barrier after
  the graph's input copies and *before* the replay;
- FreeKV's decode step reads ``req_to_token`` after its metadata is planned, inside the layers (selection and
  recall), so a write ordered after that event alone can change what a step in flight attends to;
- :func:`freekv_sglang.runtime.integration.fence_scheduler_writes` (run by ``install_runtime_hooks``) turns
  SGLang's barrier into its whole-forward form: with it, SGLang's own ``Scheduler._apply_war_barrier`` waits
  for the forward stream, not for the read-done event.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from freekv_sglang import compat
from freekv_sglang.algorithm.layout import WorkingSetLayout
from freekv_sglang.config import FreeKVConfig
from freekv_sglang.runtime import integration
from freekv_sglang.runtime.engine import FreeKVRuntime, RuntimeSettings
from freekv_sglang.runtime.sizing import ModelShape
from freekv_sglang.server_config import OVERLAP_ENV, apply_base_overrides, forced_settings

COARSE = compat.FORCE_COARSE_WAR_BARRIER.rsplit(".", 1)[1]


@pytest.fixture
def barrier_env(monkeypatch):
    """SGLang's switch starts unset-equivalent ("0") and is restored after the test."""
    monkeypatch.setenv(COARSE, "0")
    from sglang.srt.environ import envs

    return getattr(envs, COARSE)


# ------------------------------------------------------------------ SGLang's side
class _Stream:
    def __init__(self, name: str):
        self.name, self.waits = name, []

    def wait_event(self, event):
        self.waits.append(("event", event))

    def wait_stream(self, stream):
        self.waits.append(("stream", stream.name))


def _scheduler_after_a_decode_graph():
    """The state ``Scheduler._apply_war_barrier`` sees right after a decode CUDA graph was launched: the graph
    runner published its read-done event."""
    runner = SimpleNamespace(war_fastpath_read_done_event="read-done event")
    return SimpleNamespace(_war_barrier_enabled=True, model_worker=SimpleNamespace(war_fastpath_runner=runner),
                           schedule_stream=_Stream("schedule"), forward_stream=_Stream("forward")), runner


def test_sglang_decode_graph_publishes_read_done_before_its_replay():
    """The premise: a decode graph's read-done event is recorded after ``load_batch`` (input copies and
    ``init_forward_metadata_out_graph``) and before the replay, so it does not cover reads inside the graph."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

    log = []

    class Stop(Exception):
        pass

    class Event:
        def record(self):
            log.append("read-done recorded")

    class Backend:
        @contextmanager
        def replay_session(self):
            yield

        def replay(self, key, forward_batch):
            log.append("graph replay")
            raise Stop

    runner = SimpleNamespace(device_timer=None, war_fastpath_read_done_event=None,
                             spec_algorithm=SimpleNamespace(is_dflash_family=lambda: False))
    fake = SimpleNamespace(model_runner=runner, backend=Backend(), device_module=SimpleNamespace(Event=Event),
                           attn_backend=SimpleNamespace(use_captured_forward_metadata_for_breakable_cuda_graph=False),
                           load_batch=lambda fb, pp=None: log.append("load_batch"), _replay_graph_key="bs1",
                           ragged_verify_mode=False)
    with pytest.raises(Stop):
        DecodeCudaGraphRunner.execute(fake, SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=1))
    assert log == ["load_batch", "read-done recorded", "graph replay"]
    assert isinstance(runner.war_fastpath_read_done_event, Event)


def test_sglang_barrier_without_the_fence_waits_for_the_read_done_event_only(barrier_env):
    from sglang.srt.managers.scheduler import Scheduler

    sched, runner = _scheduler_after_a_decode_graph()
    Scheduler._apply_war_barrier(sched)
    assert sched.schedule_stream.waits == [("event", "read-done event")]


def test_fence_makes_sglang_barrier_wait_for_the_whole_forward(barrier_env):
    from sglang.srt.managers.scheduler import Scheduler

    integration.fence_scheduler_writes()
    assert barrier_env.get() is True
    sched, runner = _scheduler_after_a_decode_graph()
    Scheduler._apply_war_barrier(sched)
    assert sched.schedule_stream.waits == [("stream", "forward")]
    assert runner.war_fastpath_read_done_event is None  # consumed, as SGLang does


def test_install_runtime_hooks_fences(barrier_env, monkeypatch):
    monkeypatch.setattr(compat, "register_attention_backend", lambda *a, **k: None)
    monkeypatch.setattr(compat, "register_hook", lambda *a, **k: True)
    integration.install_runtime_hooks(FreeKVConfig(enabled=True, host_memory_gb=1))
    assert barrier_env.get() is True


def test_overlap_scheduler_stays_opt_in(monkeypatch):
    """Off by default (the reason names the opt-in); on with the opt-in, whose note says the writes are fenced."""
    cfg = FreeKVConfig(enabled=True, host_memory_gb=1)
    monkeypatch.delenv(OVERLAP_ENV, raising=False)
    value, reason = forced_settings(cfg)["disable_overlap_schedule"]
    assert value is True and OVERLAP_ENV in reason
    monkeypatch.setenv(OVERLAP_ENV, "1")
    assert "disable_overlap_schedule" not in forced_settings(cfg)
    notes = apply_base_overrides({"disable_overlap_schedule": False}, cfg)
    assert any("stays as configured" in n and "whole forwards" in n for n in notes)


# ------------------------------------------------------------------ FreeKV's side
P, D = 4, 8
LAYOUT = WorkingSetLayout(page_size=P, n_sink=1, n_select=1, n_window=2)
PROMPT, DONOR = 40, 4  # row 1: 10 pages (candidates 1..8 at the first decode step); row 2: one page
U = torch.zeros(D)
U[0] = 1.0


def _decode_once(write_after: str | None) -> torch.Tensor:
    """Prefill row 1 (a 40-token prompt whose page 1 points away from the query) and row 2 (a one-page donor
    whose keys align with the query and whose values are 100), then one decode step of row 1. ``write_after``
    rewrites row 1's ``req_to_token`` entries of its candidate pages to the donor's slots, as a scheduler
    write would: ``"plan"`` after the step's metadata is planned (what a read-done event recorded before
    the graph's replay allows), ``"step"`` after the whole step (what the whole-forward barrier allows).
    Returns the step's attention output of row 1."""
    g = torch.Generator().manual_seed(0)
    shape = ModelShape(1, 1, 1, D, torch.float32)
    max_ctx = 16 * P + 2
    req_to_token = torch.zeros((3, max_ctx), dtype=torch.int32)
    req_to_token[1] = torch.arange(P, P + max_ctx, dtype=torch.int32)  # host pages 1..17
    req_to_token[2] = torch.arange(20 * P, 20 * P + max_ctx, dtype=torch.int32)  # host pages 20..
    rt = FreeKVRuntime(shape, RuntimeSettings(LAYOUT, correction_threshold=0.9), 40, 2, req_to_token, max_batch=2,
                       device="cpu")
    k1 = 0.1 * torch.randn(PROMPT, 1, D, generator=g)
    k1[P:2 * P, 0] = -5.0 * U  # page 1: the lowest score, never selected by the query 3u
    v1 = 0.1 * torch.randn(PROMPT, 1, D, generator=g)
    k2, v2 = (5.0 * U).expand(DONOR, 1, D).clone(), torch.full((DONOR, 1, D), 100.0)
    q = 0.1 * torch.randn(PROMPT + DONOR, 1, D, generator=g)
    q[PROMPT - 1, 0] = 3.0 * U
    k, v = torch.cat([k1, k2]), torch.cat([v1, v2])
    rows = torch.tensor([1, 2])
    loc = torch.cat([req_to_token[1, :PROMPT], req_to_token[2, :DONOR]]).long()
    rt.store_tokens(0, k, v, loc)
    rt.prefill_layer(0, q, k, rows, [PROMPT, DONOR], loc)
    rt.finish_prefill()
    assert 1 not in rt.resident[0, 1].flatten().tolist()

    def redirect():  # row 1's candidate pages 1..8 now name the donor's page
        req_to_token[1, P:9 * P] = req_to_token[2, torch.arange(P, 9 * P) % P]

    n = torch.tensor([PROMPT + 1])
    rt.plan_decode(torch.tensor([1]), n, n)
    if write_after == "plan":
        redirect()
    out = rt.decode_layer(0, (3.0 * U).view(1, 1, D), 0.1 * torch.randn(1, 1, D, generator=g),
                          0.1 * torch.randn(1, 1, D, generator=g), req_to_token[1, PROMPT:PROMPT + 1].long(),
                          1 / math.sqrt(D))
    rt.finish_decode_step()
    if write_after == "step":
        redirect()
    return out.clone()


def test_decode_step_reads_req_to_token_after_planning():
    """A write to a live row's ``req_to_token`` after the step's metadata was planned changes the step (the
    correction selects and recalls by it inside the layer); the same write after the whole step does not."""
    clean = _decode_once(None)
    assert clean.abs().max() < 5
    after_plan = _decode_once("plan")
    assert after_plan.abs().max() > 50, "the step no longer reads req_to_token after planning: revisit the fence"
    torch.testing.assert_close(_decode_once("step"), clean, rtol=0, atol=0)
