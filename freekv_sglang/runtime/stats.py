"""Decode statistics of one runtime, counted where they arise and read without a host sync.

What the kernels know (heads corrected, (page, KV head) pieces recalled) is summed on the GPU in
``gpu`` (int64 ``[4]``, the kernels' ``counters`` argument); what the host already knows when it
plans a step (steps, requests, their context lengths) is counted on the host. All counts are
totals since start-up (monotonic).

Reading the GPU counters never waits for the GPU: every ``snapshot_every`` planned steps (and at
most one copy in flight) :meth:`DecodeStats.count_step` enqueues a copy into pinned host memory on
the current stream and records an event; :meth:`DecodeStats.totals` returns the newest copy whose
event has completed. The values therefore trail the GPU by up to ``snapshot_every`` steps plus the
step in flight. :meth:`DecodeStats.totals_now` synchronises and is for benchmarks and tests only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Indices into :attr:`DecodeStats.gpu` (written by ``decode_prologue`` and ``score_and_select``).
CORRECTED = 1  # (layer, KV head) checks of real rows that fell below the threshold
RECALLED_CRITICAL = 2  # pieces recalled before attention (correction, on the critical path)
RECALLED_SPECULATIVE = 3  # pieces recalled speculatively, overlapped with compute
N_GPU_COUNTERS = 4  # index 0 is unused


@dataclass(frozen=True)
class Totals:
    """Decode counts since start-up (a snapshot)."""

    decode_steps: int = 0
    request_steps: int = 0  # sum over steps of the real requests in the batch
    sparse_request_steps: int = 0  # ... whose context exceeded the working set (not every page resident)
    checks: int = 0  # (layer, KV head, request, step) correction checks
    corrected_heads: int = 0
    recalled_critical: int = 0  # (page, KV head) pieces
    recalled_speculative: int = 0

    @property
    def dense_request_steps(self) -> int:
        """Request-steps whose whole context fit the working set (attention was exact)."""
        return self.request_steps - self.sparse_request_steps

    def minus(self, earlier: "Totals") -> "Totals":
        return Totals(*(a - b for a, b in zip(self.astuple(), earlier.astuple())))

    def astuple(self) -> tuple[int, ...]:
        return (self.decode_steps, self.request_steps, self.sparse_request_steps, self.checks, self.corrected_heads,
                self.recalled_critical, self.recalled_speculative)

    def rates(self, piece_bytes: int) -> dict:
        """Per-interval rates of these counts (``piece_bytes``: K + V bytes of one recalled piece)."""
        rec = self.recalled_critical + self.recalled_speculative
        per_req = max(self.request_steps, 1)
        return {
            "decode_steps": self.decode_steps,
            "correction_rate": self.corrected_heads / max(self.checks, 1),
            "recalled_pieces_per_request_step": rec / per_req,
            "recall_bytes_per_request_step": rec * piece_bytes / per_req,
            "recalled_before_attention_share": self.recalled_critical / max(rec, 1),
            "sparse_request_step_share": self.sparse_request_steps / per_req,
        }


class DecodeStats:
    """GPU and host decode counters of one runtime.

    Args:
        device: where the kernels run (``gpu`` lives there).
        checks_per_request: (layer, KV head) checks per request and step.
        working_set_tokens: a request whose context is longer than this is served sparse.
        snapshot_every: planned steps between copies of the GPU counters to the host.
    """

    def __init__(self, device: torch.device, checks_per_request: int, working_set_tokens: int,
                 snapshot_every: int = 16):
        self.device = torch.device(device)
        self.gpu = torch.zeros(N_GPU_COUNTERS, dtype=torch.int64, device=self.device)
        self.checks_per_request = checks_per_request
        self.working_set_tokens = working_set_tokens
        self.snapshot_every = snapshot_every
        self.steps = self.request_steps = self.sparse_request_steps = 0
        cuda = self.device.type == "cuda"
        self._host = torch.zeros(N_GPU_COUNTERS, dtype=torch.int64, pin_memory=cuda)
        self._event = torch.cuda.Event() if cuda else None
        self._in_flight = False
        self._host_at_copy = (0, 0, 0)  # host counts when the copy in flight was enqueued
        self._last = Totals()
        self._since_copy = 0

    # ------------------------------------------------------------------ counting (host side)
    def count_step(self, seq_lens: torch.Tensor) -> None:
        """Count one planned decode step from the host copy of its lengths ``seq_lens [B]`` (CPU; padded
        CUDA-graph entries have a 1-token history and are not counted), and maybe start a snapshot."""
        if self._since_copy >= self.snapshot_every:  # before this step's counts: the GPU has not run it yet
            self.snapshot()
        self.steps += 1
        self.request_steps += int((seq_lens > 1).sum())
        self.sparse_request_steps += int((seq_lens > self.working_set_tokens).sum())
        self._since_copy += 1

    def snapshot(self) -> None:
        """Enqueue a copy of the GPU counters to the host (skipped while one is still in flight)."""
        self._collect()
        if self._in_flight:
            return
        self._host_at_copy = (self.steps, self.request_steps, self.sparse_request_steps)
        self._host.copy_(self.gpu, non_blocking=True)
        if self._event is not None:
            self._event.record()
            self._in_flight = True
        else:
            self._store()
        self._since_copy = 0

    # ------------------------------------------------------------------ reading
    def totals(self) -> Totals:
        """The newest completed snapshot (no host sync)."""
        self._collect()
        return self._last

    def totals_now(self) -> Totals:
        """Exact totals now: waits for the GPU (benchmarks and tests; never inside a decode step)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._in_flight = False
        self._host_at_copy = (self.steps, self.request_steps, self.sparse_request_steps)
        self._host.copy_(self.gpu)
        self._store()
        return self._last

    def reset(self) -> None:
        """Zero every count (benchmarks measure one interval at a time); waits for the GPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.gpu.zero_()
        self._host.zero_()
        self.steps = self.request_steps = self.sparse_request_steps = self._since_copy = 0
        self._in_flight = False
        self._host_at_copy = (0, 0, 0)
        self._last = Totals()

    def _collect(self) -> None:
        if self._in_flight and self._event.query():
            self._in_flight = False
            self._store()

    def _store(self) -> None:
        g = self._host.tolist()  # host memory: no device sync
        steps, req, sparse = self._host_at_copy
        self._last = Totals(decode_steps=steps, request_steps=req, sparse_request_steps=sparse,
                            checks=req * self.checks_per_request, corrected_heads=g[CORRECTED],
                            recalled_critical=g[RECALLED_CRITICAL], recalled_speculative=g[RECALLED_SPECULATIVE])
