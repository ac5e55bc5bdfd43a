"""Benchmark-only synthetic query locality (``FREEKV_BENCH_QUERY_COSINE``).

Speed benchmarks run models with random weights (``--load-format dummy``), whose consecutive
decode queries are unrelated: every KV head fails the correction check and most selected pages
change every step, FreeKV's worst case. Real models keep consecutive queries close (the
correction threshold exists because they usually are). To time the data path at a chosen
locality, this replaces each decode query by ``u + sigma * e``: ``u`` a fixed random direction per
(layer, request row, query head), ``e`` the model's own query normalised to the same length, so
consecutive queries of a head have cosine about ``c = 1 / (1 + sigma^2)``. Attention then uses
the replaced queries: **generated tokens are meaningless**; never set it when serving.

That fixed-cosine setting (``--query-cosine 0.95`` in the benchmarks) is optimistic: a trained model's
consecutive queries are much less alike by the correction check (SmolLM2-135M: 83% of (layer, KV head,
step) checks fall below 0.9), yet far fewer of its selected pages change per step than the same check
similarity would change under the benchmark's random keys. :class:`CalibratedQueries`
(``FREEKV_BENCH_LOCALITY``) reproduces both measured rates of
``python -m freekv_sglang.fidelity.locality``:

* **check similarity** per (layer, request, KV head, step): drawn from the measured distribution of that
  (layer, KV head) (its percentiles; the benchmark model's layers and KV heads are mapped onto the
  measured ones by relative depth and modulo), so the correction rate at any threshold is the measured one;
* **page change**: the query heads of a group step from their previous query by a smaller angle,
  ``cos = 1 - kappa * (1 - s)`` for a drawn similarity ``s``; ``kappa`` per (layer, KV head, context) is
  calibrated (:func:`page_change_curve`, the reference selection over Gaussian keys, which is what the
  benchmark's random-weight keys are) so that the expected share of selected pages that change per step
  equals the measured one;
* the group's last query heads (the *decoys*: one per three query heads, at least one) carry the rest of
  the drop in similarity: they move by the cosine that makes the group's mean ``s`` and have ``1/1024``
  of the others' norm, so they weigh next to nothing in the GQA-mean page scores. A mean below what the
  decoys can reach (``((G - m) * cos - m) / G`` for ``m`` decoys; Llama-3.1-8B shape at 32K: about 0.5) is
  realised at that floor, which changes no correction at the thresholds in use. Decode timing depends on
  which heads the check flags and on how many selected pages each selection misses, not on query values.

Models without GQA (one query head per KV head) have no decoy: their page change follows the drawn
similarity (``kappa = 1``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

ROW_SLOTS = 64  # distinct directions per layer; rows share them modulo this


class SyntheticQueries:
    """Fixed directions ``[L, ROW_SLOTS, Hq, D]`` and the mixing of :func:`apply`."""

    def __init__(self, n_layers: int, n_q_heads: int, head_dim: int, cosine: float, device, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        u = torch.randn(n_layers, ROW_SLOTS, n_q_heads, head_dim, generator=g)
        self.u = (torch.nn.functional.normalize(u, dim=-1) * math.sqrt(head_dim)).to(device)
        self.sigma = math.sqrt(1.0 / cosine - 1.0)
        self.cosine = cosine

    def apply(self, layer: int, q: torch.Tensor, rows: torch.Tensor, n: torch.Tensor | None = None,
              q_prev: torch.Tensor | None = None) -> torch.Tensor:
        """``q [B, Hq, D]`` -> ``u[layer, rows % ROW_SLOTS] + sigma * sqrt(D) * q / |q|`` (q's dtype).
        (``n`` and ``q_prev``, which :class:`CalibratedQueries` uses, are ignored.)
        One kernel on CUDA (:func:`freekv_sglang.kernels.synthetic_query.mix_queries`), CUDA-graph safe."""
        from freekv_sglang.kernels.synthetic_query import mix_queries

        return mix_queries(q, self.u[layer], rows, self.sigma)


# -- calibrated locality -------------------------------------------------------------------------
#: ``FREEKV_BENCH_LOCALITY=calibrated``: the measurement kept in the repository (relative to its root), per page
#: scoring: each rule's page change is that of its own selection on the real model.
DEFAULT_LOCALITIES = {"quest": os.path.join("docs", "data", "locality-smollm2-135m.json"),
                      "grid2": os.path.join("docs", "data", "locality-smollm2-135m-grid2.json")}
DECOY_SCALE = 1.0 / 1024  # the decoy head's norm relative to the others'
NOISE_VECTORS = 4096
PULL = 0.5  # how strongly a step's direction leans back towards the head's anchor (keeps queries from drifting)
#: Ranking-step sizes ``1 - cos`` at which :func:`page_change_curve` is simulated.
STEP_GRID = (0.0, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.25, 0.4, 0.6, 1.0)
KAPPA_MAX = 4.0
MIN_BIN = 12  # smallest context bin 2**12 = 4096 tokens
_U_POINTS = 400  # points of the uniform draw at which expectations are evaluated


def resolve_locality(spec: str, scoring: str = "quest") -> str:
    """``calibrated`` -> the repository's measurement for the page ``scoring`` (:data:`DEFAULT_LOCALITIES`);
    ``calibrated:PATH`` or a path -> that path. Raises ``FileNotFoundError`` with the command that writes one."""
    if scoring not in DEFAULT_LOCALITIES:
        raise ValueError(f"no calibrated locality for page scoring {scoring!r}; use one of {sorted(DEFAULT_LOCALITIES)}")
    path = spec.split(":", 1)[1] if spec.startswith("calibrated:") else spec
    if path == "calibrated":
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.path.join(root, DEFAULT_LOCALITIES[scoring])
    if not os.path.isfile(path):
        rule = "" if scoring == "quest" else " --rule grid2sink128"
        raise FileNotFoundError(f"no locality measurement at {path}: write one with "
                                f"python -m freekv_sglang.fidelity.locality{rule} --json PATH")
    return path


def page_scorer(scoring: str, keys: torch.Tensor, layout):
    """The reference page scores of the runtime's rule ``scoring`` over one sequence's ``keys [n, Hkv, D]``:
    returns ``(score, n_pages)``, ``score(q [B, Hq, D]) -> [B, Hq, n_pages]`` (every full page; candidacy is the
    caller's). ``quest``: Quest's bound on the page digests; ``grid2``: 2-bit codes on the grid fitted to the
    sink's keys (the runtime's ``--freekv-page-scoring grid2``, rule ``grid2sink<sink tokens>``)."""
    from freekv_sglang.algorithm.scoring_rules import get_rule

    if scoring not in DEFAULT_LOCALITIES:
        raise ValueError(f"unknown page scoring {scoring!r}; use one of {sorted(DEFAULT_LOCALITIES)}")
    name = scoring
    if scoring == "grid2":
        sink = layout.n_sink * layout.page_size
        if sink <= 0:
            raise ValueError("grid2 page scoring fits its grid on the sink: the layout has no sink pages")
        name = f"grid2sink{sink}"
    rule = get_rule(name)
    ctx = rule.fit(keys)
    dig = rule.digests(keys, layout.page_size, ctx)  # quest: [Np, Hkv, 2, D] bounds; grid2: [Np, Hkv, P, D] codes
    return (lambda q: rule.scores_shared(q, dig, ctx)), dig.shape[0]


@dataclass
class MeasuredLocality:
    """Per (layer, KV head) of the measured model: similarity percentiles 0..100 and page-change share."""

    quant: torch.Tensor  # float32 [Ls, Hs, 101]
    page_share: torch.Tensor  # float32 [Ls, Hs] at the measurement's default budget
    budget: int
    source: str
    share_corrected: torch.Tensor | None = None  # float32 [Ls, Hs]: page change of the steps the check corrects
    rule: str = "quest"  # the scoring rule whose selection was replayed (older measurements: quest)

    @classmethod
    def load(cls, path: str) -> "MeasuredLocality":
        with open(path) as f:
            data = json.load(f)
        if "heads" not in data:
            raise ValueError(f"{path}: not a locality measurement (python -m freekv_sglang.fidelity.locality --json)")
        budget = int(data.get("meta", {}).get("working set", {}).get("default_budget", 1024))
        quant = torch.tensor([[h["similarity"]["percentiles"] for h in layer] for layer in data["heads"]],
                             dtype=torch.float32)
        share = torch.tensor([[h["page_change"][str(budget)] for h in layer] for layer in data["heads"]],
                             dtype=torch.float32)
        if quant.shape[-1] != 101:
            raise ValueError(f"{path}: expected 101 percentiles per head, got {quant.shape[-1]}")
        corr = torch.tensor([[h.get("page_change_corrected") if h.get("page_change_corrected") is not None
                              else h["page_change"][str(budget)] for h in layer] for layer in data["heads"]],
                            dtype=torch.float32)
        ws = data.get("meta", {}).get("working set", {})
        if ws.get("keep_margin"):
            raise ValueError(f"{path}: measured with a keep margin of {ws['keep_margin']} pages; calibrate to the "
                             "plain selection's page change (the runtime applies its own --freekv-keep-margin)")
        return cls(quant, share, budget, path, corr, ws.get("page_scoring", "quest"))

    def check_scoring(self, scoring: str) -> None:
        """Refuse calibrating a runtime's page ``scoring`` to another rule's page change (``ValueError``)."""
        fits = self.rule == "quest" if scoring == "quest" else self.rule.startswith(f"{scoring}sink")
        if not fits:
            raise ValueError(f"{self.source} measured the page change of the {self.rule!r} selection; the runtime "
                             f"scores pages with {scoring!r}: use its own measurement (calibrated, or python -m "
                             f"freekv_sglang.fidelity.locality --rule {scoring}sink128 --json PATH)")

    def mapped(self, n_layers: int, n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, list, list]:
        """Tables for a model of ``n_layers`` x ``n_kv_heads``: layer ``l`` takes the measured layer at the same
        relative depth, KV head ``h`` the measured head ``h % Hs``. Returns ``(quant [L, Hkv, 101],
        page_share [L, Hkv], source layers, source heads)``."""
        ls, hs = self.quant.shape[:2]
        src_l = [round(l * (ls - 1) / max(n_layers - 1, 1)) for l in range(n_layers)]
        src_h = [h % hs for h in range(n_kv_heads)]
        li, hi = torch.tensor(src_l), torch.tensor(src_h)
        return (self.quant[li][:, hi].contiguous(), self.page_share[li][:, hi].contiguous(), src_l, src_h)


def similarity_at(quant: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The generator's similarity for uniform draws ``x`` in (0, 1): linear between percentiles.
    ``quant [..., 101]``, ``x [M]`` -> ``[..., M]``."""
    pos = x * 100.0
    i0 = pos.floor().long().clamp(max=99)
    f = pos - i0.float()
    return quant[..., i0] + f * (quant[..., i0 + 1] - quant[..., i0])


def _uniform_points(m: int = _U_POINTS) -> torch.Tensor:
    return (torch.arange(m, dtype=torch.float32) + 0.5) / m


def correction_rate(quant: torch.Tensor, tau: float) -> torch.Tensor:
    """Share of draws below ``tau`` per table row: ``quant [..., 101]`` -> ``[...]``."""
    return (similarity_at(quant, _uniform_points(4000)) < tau).float().mean(-1)


def _interp(grid: torch.Tensor, vals: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear ``vals`` over increasing ``grid`` at ``x`` (clamped to the ends)."""
    x = x.clamp(float(grid[0]), float(grid[-1]))
    i = (torch.searchsorted(grid, x, right=True) - 1).clamp(0, len(grid) - 2)
    g0, g1 = grid[i], grid[i + 1]
    return vals[i] + (x - g0) / (g1 - g0) * (vals[i + 1] - vals[i])


def expected_share(quant_row: torch.Tensor, kappa: float, grid: torch.Tensor, curve: torch.Tensor) -> float:
    """Expected page change of a head whose draws follow ``quant_row [101]`` at ``kappa``, given the
    page-change ``curve`` over ranking-step sizes ``grid`` (``1 - cos``)."""
    s = similarity_at(quant_row, _uniform_points())
    step = (kappa * (1.0 - s)).clamp(0.0, 2.0)
    return float(_interp(grid, curve, step).mean())


def expected_shares(quant: torch.Tensor, kappa: torch.Tensor, grid: torch.Tensor, curve: torch.Tensor) -> torch.Tensor:
    """:func:`expected_share` of many heads at once: ``quant [R, 101]``, ``kappa [R]`` -> ``[R]``."""
    s = similarity_at(quant, _uniform_points())  # [R, M]
    step = (kappa[:, None] * (1.0 - s)).clamp(0.0, 2.0)
    return _interp(grid, curve, step.flatten()).view_as(step).mean(-1)


def solve_kappa(quant_row: torch.Tensor, target: float, grid: torch.Tensor, curve: torch.Tensor,
                kappa_max: float = KAPPA_MAX, iters: int = 40) -> float:
    """``kappa`` at which :func:`expected_share` equals ``target`` (bisection; ``kappa_max`` where out of reach)."""
    return float(solve_kappas(quant_row[None], torch.tensor([float(target)]), grid, curve, kappa_max, iters)[0])


def solve_kappas(quant: torch.Tensor, target: torch.Tensor, grid: torch.Tensor, curve: torch.Tensor,
                 kappa_max: float = KAPPA_MAX, iters: int = 40) -> torch.Tensor:
    """:func:`solve_kappa` for many heads at once (``quant [R, 101]``, ``target [R]``), bisection in parallel."""
    lo = torch.zeros(len(quant))
    hi = torch.full((len(quant),), kappa_max)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = expected_shares(quant, mid, grid, curve) < target
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    out = 0.5 * (lo + hi)
    return torch.where(expected_shares(quant, torch.full_like(out, kappa_max), grid, curve) <= target,
                       torch.full_like(out, kappa_max), out)


class CalibratedQueries:
    """Synthetic decode queries at a measured locality (``FREEKV_BENCH_LOCALITY``; see the module docstring).

    Args:
        path: a ``python -m freekv_sglang.fidelity.locality --json`` file (or ``calibrated``).
        n_layers, n_q_heads, n_kv_heads, head_dim: the served model's attention shape.
        layout: the working set (:class:`~freekv_sglang.algorithm.layout.WorkingSetLayout`).
        max_context: the longest history (tokens); ``kappa`` is calibrated at powers of two from 4096
            (or ``max_context`` if smaller) up to it, and interpolated in ``log2(n)`` between them.
        contexts: calibrate at ``[2**b0, 2**(b0+1), ...]`` given as ``b0`` and a count instead (tests).
        scoring: the runtime's page scoring (``quest`` or ``grid2``): the selection whose page change is
            calibrated, and the measurement ``calibrated`` stands for.
    """

    def __init__(self, path: str, n_layers: int, n_q_heads: int, n_kv_heads: int, head_dim: int, layout,
                 max_context: int, device, seed: int = 0, bins: tuple[float, int] | None = None,
                 dtype: torch.dtype = torch.bfloat16, curve_steps: int = 48, curve_heads: int = 4,
                 scoring: str = "quest"):
        self.scoring = scoring
        self.path = resolve_locality(path, scoring)
        self.measured = MeasuredLocality.load(self.path)
        self.measured.check_scoring(scoring)
        self.n_layers, self.n_q_heads, self.n_kv_heads, self.head_dim = n_layers, n_q_heads, n_kv_heads, head_dim
        if n_q_heads % n_kv_heads:
            raise ValueError(f"{n_q_heads} query heads are not a multiple of {n_kv_heads} KV heads")
        self.group = n_q_heads // n_kv_heads
        self.layout = layout
        self.seed = seed
        quant, share, self.src_layers, self.src_heads = self.measured.mapped(n_layers, n_kv_heads)
        self.quant_cpu, self.target_share = quant, share
        sc = self.measured.share_corrected if self.measured.share_corrected is not None else self.measured.page_share
        self.target_share_corrected = sc[torch.tensor(self.src_layers)][:, torch.tensor(self.src_heads)]
        if bins is None:
            top = max(float(max_context), 2.0)
            if top <= 2 ** MIN_BIN:
                bins = (math.log2(top), 1)
            else:
                bins = (float(MIN_BIN), math.ceil(math.log2(top)) - MIN_BIN + 1)
        self.bin0, nb = float(bins[0]), int(bins[1])
        self.contexts = [int(round(2 ** (self.bin0 + i))) for i in range(nb)]
        g = torch.Generator().manual_seed(seed)
        u = torch.randn(n_layers, ROW_SLOTS, n_q_heads, head_dim, generator=g)
        self.u = (torch.nn.functional.normalize(u, dim=-1) * math.sqrt(head_dim)).to(device)
        self.noise = torch.randn(NOISE_VECTORS, head_dim, generator=g).to(device)
        self.grid = torch.tensor(STEP_GRID, dtype=torch.float32)
        self.curves = torch.stack([page_change_curve(c, layout, n_q_heads // n_kv_heads, head_dim, device,
                                                     steps=curve_steps, kv_heads=curve_heads, dtype=dtype,
                                                     seed=seed + 1 + i, scoring=scoring)
                                   for i, c in enumerate(self.contexts)])
        kappa = torch.ones(n_layers, n_kv_heads, nb)
        if self.group > 1:
            for b in range(nb):
                if float(self.curves[b].max()) <= 1e-6:  # everything selected at this context: nothing to calibrate
                    continue
                kappa[..., b] = solve_kappas(quant.flatten(0, 1), share.flatten(), self.grid,
                                             self.curves[b]).view(n_layers, n_kv_heads)
        self.kappa_cpu = kappa
        self.quant = quant.to(device)
        self.kappa = kappa.to(device)
        if self.u.is_cuda:
            torch.cuda.empty_cache()  # the calibration's scratch

    # -- the generator ---------------------------------------------------------------------
    def apply(self, layer: int, q: torch.Tensor, rows: torch.Tensor, n: torch.Tensor | None = None,
              q_prev: torch.Tensor | None = None) -> torch.Tensor:
        """Replace ``q [B, Hq, D]`` of one layer: ``n [B]`` history lengths (the new token included),
        ``q_prev [R', Hq, D]`` the runtime's previous query per request row (read before it is updated)."""
        from freekv_sglang.kernels.synthetic_query import calibrated_queries

        if n is None or q_prev is None:
            raise ValueError("calibrated synthetic queries need the history lengths and the previous queries")
        return calibrated_queries(q, q_prev, self.u[layer], self.noise, self.quant[layer], self.kappa[layer], rows,
                                  n, layer=layer, seed=self.seed, group=self.group, bin0=self.bin0,
                                  decoy=DECOY_SCALE, pull=PULL)

    # -- what it is calibrated to ------------------------------------------------------------
    def predicted_share(self) -> torch.Tensor:
        """Expected page change per (layer, KV head, context bin) from the curves: ``[L, Hkv, NB]``."""
        out = torch.zeros_like(self.kappa_cpu)
        for b in range(len(self.contexts)):
            out[..., b] = expected_shares(self.quant_cpu.flatten(0, 1), self.kappa_cpu[..., b].flatten(), self.grid,
                                          self.curves[b]).view(self.n_layers, self.n_kv_heads)
        return out

    def summary(self, tau: float = 0.9) -> dict:
        pred = self.predicted_share()
        return {
            "locality": self.path, "page_scoring": self.scoring, "tau": tau,
            "correction_rate": round(float(correction_rate(self.quant_cpu, tau).mean()), 4),
            "page_change_target": round(float(self.target_share.mean()), 4),
            "page_change_predicted": {c: round(float(pred[..., i].mean()), 4) for i, c in enumerate(self.contexts)},
            "kappa_mean": {c: round(float(self.kappa_cpu[..., i].mean()), 4) for i, c in enumerate(self.contexts)},
            "decoy": self.group > 1,
        }


def page_change_curve(n_tokens: int, layout, group: int, head_dim: int, device="cpu", steps: int = 48,
                      kv_heads: int = 4, grid=STEP_GRID, dtype: torch.dtype = torch.bfloat16, seed: int = 1,
                      chunk_bytes: int = 1 << 28, scoring: str = "quest") -> torch.Tensor:
    """Share of the selected pages that change per step when every non-decoy query head steps by
    ``cos = 1 - delta`` (for each ``delta`` of ``grid``), with the calibrated generator and the reference
    selection (``scoring``'s page scores, :func:`page_scorer`; GQA mean, top-k over the candidates) over
    Gaussian keys: the benchmark's random-weight model has keys of that kind (independent random tokens
    through random projections).

    The history grows from ``n_tokens`` by one token per step, as in decoding. Returns float32 ``[len(grid)]``.
    """
    from freekv_sglang.algorithm import aggregate_gqa, changed_pages, topk_pages
    from freekv_sglang.kernels.synthetic_query import calibrated_queries

    g = torch.Generator().manual_seed(seed)
    hq = kv_heads * group
    keys = torch.randn(n_tokens + steps + 1, kv_heads, head_dim, generator=g).to(device)
    score, n_pages = page_scorer(scoring, keys, layout)
    u = torch.nn.functional.normalize(torch.randn(1, hq, head_dim, generator=g), dim=-1).mul(math.sqrt(head_dim))
    u = u.to(device)
    noise = torch.randn(NOISE_VECTORS, head_dim, generator=g).to(device)
    rows = torch.zeros(1, dtype=torch.int64, device=device)
    if scoring == "quest":
        per_step = 3 * hq * n_pages * head_dim * 4  # quest_scores keeps about three [Hq, Np, D] float32 temporaries
    else:
        per_step = 2 * hq * n_pages * layout.page_size * 4  # grid2: per-token logits [Hq, Np, P] and their exp
    chunk = max(1, chunk_bytes // max(per_step, 1))
    out = []
    for delta in grid:
        quant = torch.full((kv_heads, 101), 1.0 - float(delta), dtype=torch.float32, device=device)
        kappa = torch.ones(kv_heads, 1, dtype=torch.float32, device=device)
        q_prev = torch.zeros(1, hq, head_dim, dtype=dtype, device=device)
        qs = []
        for t in range(steps + 1):
            n = torch.full((1,), n_tokens + t, dtype=torch.int64, device=device)
            q = calibrated_queries(q_prev, q_prev, u, noise, quant, kappa, rows, n, layer=0, seed=seed, group=group,
                                   bin0=0.0, decoy=DECOY_SCALE, pull=PULL)
            q_prev = q
            qs.append(q[0])
        q_all = torch.stack(qs)  # [T+1, Hq, D]
        n_all = torch.arange(n_tokens, n_tokens + steps + 1, device=device)
        sels = []
        for c0 in range(0, steps + 1, chunk):
            qc, nc = q_all[c0: c0 + chunk], n_all[c0: c0 + chunk]
            agg = aggregate_gqa(score(qc), kv_heads, "mean", layout.candidate_mask(nc, n_pages))
            sels.append(topk_pages(agg, layout.n_select))
        sel = torch.cat(sels)  # [T+1, Hkv, k]
        ch = changed_pages(sel[:-1], sel[1:]).float()
        cnt = (sel[1:] >= 0).sum(-1).float()
        ok = cnt > 0
        out.append(float((ch[ok] / cnt[ok]).mean()) if bool(ok.any()) else 0.0)
    return torch.cummax(torch.tensor(out, dtype=torch.float32), 0).values  # monotone in the step size
