"""Page-scoring rules: what FreeKV keeps per page (its *digest*) and how a query ranks pages with it.

A rule has three parts, all per (request, layer):

* ``fit(keys)``: an optional context learned once from the prompt's keys at prefill (a basis, a
  mean); ``None`` for rules that need none. It is kept for the request's life: keys decoded later
  are digested with the same context.
* ``digests(keys, page_size, ctx)``: ``[n_full_pages, Hkv, R, C]`` per full page and KV head, ``R``
  vectors of ``C`` channels (float32 here; the serving path would keep them in the KV dtype).
* ``scores(q, digests, ctx)``: float32 ``[B, Hq, Np]``, one score per (query head, page); the GQA
  aggregation (:func:`~freekv_sglang.algorithm.scores.aggregate_gqa`) and top-k are shared by every rule.

Rules (``D`` head dim, ``P`` page size, ``G`` tokens per group; "values" are per (page, KV head) in
16-bit units, so packed codes count as a fraction of a value; Quest's ``2 D`` is the baseline):

========  =====================================================  ============  ===================
name      digest (per page and KV head) / score                  values        MACs/(q head, page)
========  =====================================================  ============  ===================
quest     channel max/min of the keys; sum_d max(q mx, q mn)     2 D           2 D
boxB[gG]  Quest box + B-bit code per (token/group, channel)      2D + PDB/16G  P D / G
gridB     every key in B bits on a grid fitted to the prompt     P D B/16      P D
          (``...sink[N]``: to the first N prompt tokens;
          ``mm``: min/max; ``x0``: token 0 left out of the fit)
keyslse   every key exactly (diagnostic)                         P D           P D
========  =====================================================  ============  ===================

The ``lse`` rules score ``logsumexp_t q . k_hat_t / sqrt(D)`` over the page's (approximate) keys, the log of
the page's unnormalised attention mass; a ``max`` suffix (``boxBmax``, ``keysmax``) scores the largest logit
instead. ``keyslse`` is the diagnostic: the exact page-mass ranking that ``exact`` fidelity rows use, up to GQA
aggregation. ``gridB`` learns its grid per KV head from the prompt's keys (``fit``) and keeps it for the
request; ``gridBsink`` fits it on the sink tokens, which every request sharing a page also shares.

The study that chose ``grid2sink`` also screened representative keys, k-means centroids, mean-plus-spread
digests, sub-page boxes, PCA boxes, low-rank and channel sketches, 1-bit split codes, per-model calibrated grids
and a Quest prefilter; they lost (docs/FIDELITY.md, "Needle retrieval in natural text", with their numbers and
the commit that still has their code) and were removed.

:func:`get_rule` parses every name above. ``quest`` is the default; it equals :func:`~.scores.quest_scores` over
:func:`~.digests.page_digests` exactly. The runtime and the kernels implement ``quest`` and ``grid2sink``
(``--freekv-page-scoring grid2``: the grid fitted on the sink tokens, once the sink is full).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .digests import page_digests
from .scores import quest_scores


def _pages(keys: torch.Tensor, page_size: int) -> torch.Tensor:
    """``[n, Hkv, D]`` -> ``[n_full, P, Hkv, D]`` float32 (a trailing partial page is dropped)."""
    n_full = keys.shape[0] // page_size
    return keys[: n_full * page_size].float().unflatten(0, (n_full, page_size))


class ScoringRule:
    """Base class; see the module docstring. Subclasses set :attr:`name`."""

    name = "?"

    def fit(self, keys: torch.Tensor):
        """Context from the prompt's keys ``[n, Hkv, D]`` (``None``: the rule needs none)."""
        return None

    def digests(self, keys: torch.Tensor, page_size: int, ctx=None) -> torch.Tensor:
        raise NotImplementedError

    def scores(self, q: torch.Tensor, digests: torch.Tensor, ctx=None) -> torch.Tensor:
        raise NotImplementedError

    def scores_shared(self, q: torch.Tensor, digests: torch.Tensor, ctx=None) -> torch.Tensor:
        """:meth:`scores` of queries ``[B, Hq, D]`` against one set of digests ``[Np, ...]`` shared by all ``B``
        (a replay of one sequence's positions): ``[B, Hq, Np]``. Rules whose scores are a product with
        per-token keys override it with one matrix product instead of ``B`` copies of the digests."""
        return self.scores(q, digests[None].expand(q.shape[0], *digests.shape), ctx)

    def digest_values(self, page_size: int, head_dim: int) -> int:
        """Digest values per (page, KV head)."""
        raise NotImplementedError

    def score_macs(self, page_size: int, head_dim: int) -> int:
        """Multiply-adds (or multiply-max) per (query head, candidate page)."""
        raise NotImplementedError

    def append(self, digests: torch.Tensor, keys: torch.Tensor, page_size: int, ctx=None) -> torch.Tensor:
        """``digests`` of the first pages, extended by the digests of every page now full in ``keys``."""
        n_full = keys.shape[0] // page_size
        have = digests.shape[0]
        if n_full <= have:
            return digests
        new = self.digests(keys[have * page_size : n_full * page_size], page_size, ctx)
        return torch.cat([digests.to(new.dtype), new], dim=0)

    def __repr__(self):
        return f"<scoring rule {self.name}>"


# ---------------------------------------------------------------------------------------------
class Quest(ScoringRule):
    """The current rule: channel-wise max/min box of the page's keys, upper bound of ``q . k``."""

    name = "quest"

    def digests(self, keys, page_size, ctx=None):
        return page_digests(keys, page_size)  # [n, Hkv, 2, D] in the keys' dtype

    def scores(self, q, digests, ctx=None):
        return quest_scores(q, digests)

    def append(self, digests, keys, page_size, ctx=None):
        from .digests import append_page_digest

        return append_page_digest(digests, keys, page_size)

    def digest_values(self, page_size, head_dim):
        return 2 * head_dim

    def score_macs(self, page_size, head_dim):
        return 2 * head_dim


def _reduce_tokens(logits: torch.Tensor, reduce: str) -> torch.Tensor:
    """Page score from per-token approximate logits ``[..., P]``: ``lse`` (log of the page's attention mass,
    up to a constant) or ``max``."""
    return torch.logsumexp(logits, -1) if reduce == "lse" else logits.amax(-1)


@dataclass(frozen=True, repr=False)
class TokenKeys(ScoringRule):
    """Every key of the page, exactly (a diagnostic: ``P D`` values): ``lse`` or ``max`` over the page's
    tokens of ``q . k_t / sqrt(D)``."""

    reduce: str = "lse"

    @property
    def name(self):
        return f"keys{self.reduce}"

    def digests(self, keys, page_size, ctx=None):
        return _pages(keys, page_size).permute(0, 2, 1, 3)  # [n, Hkv, P, D]

    def scores(self, q, digests, ctx=None):
        b, hq, d = q.shape
        hkv = digests.shape[2]
        logits = torch.einsum("bkgd,bpktd->bkgpt", q.float().view(b, hkv, hq // hkv, d), digests.float()) / math.sqrt(d)
        return _reduce_tokens(logits, self.reduce).reshape(b, hq, -1)

    def digest_values(self, page_size, head_dim):
        return page_size * head_dim

    def score_macs(self, page_size, head_dim):
        return page_size * head_dim


@dataclass(frozen=True, repr=False)
class BoxCodes(ScoringRule):
    """The Quest box plus a ``bits``-bit code per (group of ``group`` tokens, channel) placing the group's mean
    key inside its page's box: ``k_hat[j, d] = mn[d] + (code[j, d] + 1/2) * (mx[d] - mn[d]) / 2**bits``; a page
    scores ``lse`` or ``max`` over its groups of ``q . k_hat_j / sqrt(D)``.

    Digest ``[n, Hkv, 2 + P / group, D]``: max, min, then the codes (integers in ``[0, 2**bits)``, kept as
    floats here; ``P D bits / (8 group)`` bytes packed)."""

    bits: int = 1
    reduce: str = "lse"
    group: int = 1

    @property
    def name(self):
        return f"box{self.bits}" + (f"g{self.group}" if self.group > 1 else "") + ("" if self.reduce == "lse" else self.reduce)

    def digests(self, keys, page_size, ctx=None):
        pg = _pages(keys, page_size)  # [n, P, Hkv, D]
        mx, mn = pg.amax(1), pg.amin(1)  # [n, Hkv, D]
        if self.group > 1:
            pg = pg.unflatten(1, (page_size // self.group, self.group)).mean(2)
        levels = 2 ** self.bits
        x = (pg - mn[:, None]) / (mx - mn).clamp_min(1e-30)[:, None]  # [0, 1]
        code = (x * levels).floor().clamp(0, levels - 1)
        return torch.cat([mx[:, :, None], mn[:, :, None], code.permute(0, 2, 1, 3)], dim=2)

    def scores(self, q, digests, ctx=None):
        b, hq, d = q.shape
        hkv = digests.shape[2]
        dig = digests.float()
        mx, mn, code = dig[:, :, :, 0:1], dig[:, :, :, 1:2], dig[:, :, :, 2:]
        k_hat = mn + (code + 0.5) * (mx - mn) / 2 ** self.bits  # [B, Np, Hkv, P / group, D]
        logits = torch.einsum("bkgd,bpktd->bkgpt", q.float().view(b, hkv, hq // hkv, d), k_hat) / math.sqrt(d)
        return _reduce_tokens(logits, self.reduce).reshape(b, hq, -1)

    def digest_values(self, page_size, head_dim):
        return 2 * head_dim + page_size // self.group * head_dim * self.bits / 16  # codes in 16-bit values

    def score_macs(self, page_size, head_dim):
        return page_size // self.group * head_dim


SINK_TOKENS = 512  # the plugin's default sink; what ``gridBsink`` fits on unless its name gives a count

@dataclass(frozen=True, repr=False)
class GridCodes(ScoringRule):
    """Every key of the page in ``bits`` bits per channel on a grid per KV head and channel (``2**bits`` equal
    steps between ``lo`` and ``hi``; values outside are clamped); a page scores ``lse`` over its tokens of
    ``q . k_hat_t / sqrt(D)``. No per-page box. Digest ``[n, Hkv, P, D]`` codes (``P D bits / 8`` bytes packed).

    What the grid is fitted on (``fit``), and how (``minmax``: the keys' min and max, else their 0.5% and
    99.5% quantiles; ``skip0``: token 0, the attention sink with outlier keys, left out):

    * ``"prompt"`` (``gridB``): the request's prompt. ``grid2`` is the candidate page-scoring rule (module
      docstring), but such a grid differs between requests that share a cached prefix.
    * ``"sink"`` (``gridBsink[N]``): the prompt's first ``sink`` tokens (default :data:`SINK_TOKENS`, the
      plugin's sink). Every request that shares a page beyond the sink shares these tokens, so the grid and
      the digests are the same for all of them; the sink's keys stay on the GPU. (Fitted at prefill here: a
      prompt shorter than ``sink`` fits on what it has, where a runtime would fit once the sink is full.)
    """

    bits: int = 2
    fit_on: str = "prompt"
    minmax: bool = False
    skip0: bool = False
    sink: int = SINK_TOKENS

    @property
    def name(self):
        src = "sink" + (str(self.sink) if self.sink != SINK_TOKENS else "") if self.fit_on == "sink" else ""
        return f"grid{self.bits}{src}" + ("mm" if self.minmax else "") + ("x0" if self.skip0 else "")

    def grid(self, keys: torch.Tensor):
        """``(lo, hi)`` ``[Hkv, D]`` of keys ``[n, Hkv, D]`` (all of them: the choice of tokens is the caller's)."""
        k = keys.float()
        if self.skip0 and k.shape[0] > 1:
            k = k[1:]
        if self.minmax:
            return k.amin(0), k.amax(0)
        return torch.quantile(k, 0.005, dim=0), torch.quantile(k, 0.995, dim=0)

    def fit(self, keys):
        return self.grid(keys[: self.sink] if self.fit_on == "sink" else keys)

    def digests(self, keys, page_size, ctx=None):
        lo, hi = ctx
        levels = 2 ** self.bits
        x = (keys.float() - lo) / (hi - lo).clamp_min(1e-30)
        code = (x * levels).floor().clamp(0, levels - 1)
        return _pages(code, page_size).permute(0, 2, 1, 3)

    def keys_hat(self, digests, ctx):
        """The grid's key per code: ``digests [..., Hkv, P, D]`` -> float32 of the same shape (the middle of
        each code's step)."""
        lo, hi = ctx
        return lo[:, None] + (digests.float() + 0.5) * ((hi - lo) / 2 ** self.bits)[:, None]

    def scores(self, q, digests, ctx=None):
        b, hq, d = q.shape
        hkv = digests.shape[2]
        k_hat = self.keys_hat(digests, ctx)  # [B, Np, Hkv, P, D]
        logits = torch.einsum("bkgd,bpktd->bkgpt", q.float().view(b, hkv, hq // hkv, d), k_hat) / math.sqrt(d)
        return torch.logsumexp(logits, -1).reshape(b, hq, -1)

    def scores_shared(self, q, digests, ctx=None):
        b, hq, d = q.shape
        n_pages, hkv, p = digests.shape[:3]
        k_hat = self.keys_hat(digests, ctx).permute(1, 3, 0, 2).reshape(hkv, d, n_pages * p)  # [Hkv, D, Np P]
        logits = torch.matmul(q.float().view(b, hkv, hq // hkv, d).transpose(0, 1).reshape(hkv, -1, d), k_hat)
        logits = logits.view(hkv, b, hq // hkv, n_pages, p) / math.sqrt(d)
        return torch.logsumexp(logits, -1).permute(1, 0, 2, 3).reshape(b, hq, n_pages)

    def digest_values(self, page_size, head_dim):
        return page_size * head_dim * self.bits / 16

    def score_macs(self, page_size, head_dim):
        return page_size * head_dim


_PATTERNS = (
    (re.compile(r"keys(lse|max)$"), lambda m: TokenKeys(m.group(1))),
    (re.compile(r"box(\d+)(?:g(\d+))?(max)?$"),
     lambda m: BoxCodes(int(m.group(1)), m.group(3) or "lse", int(m.group(2) or 1))),
    (re.compile(r"grid(\d+)(?:(sink)(\d*))?(mm)?(x0)?$"),
     lambda m: GridCodes(int(m.group(1)), "sink" if m.group(2) else "prompt", bool(m.group(4)), bool(m.group(5)),
                         int(m.group(3) or SINK_TOKENS))),
)
RULES = {"quest": Quest()}
NAMES = ("quest", "boxB[gG][max]", "gridB[sink[N]][mm][x0]", "keys{lse,max}")


def get_rule(name: str) -> ScoringRule:
    """The rule called ``name`` (the module docstring lists them)."""
    if name in RULES:
        return RULES[name]
    for pat, make in _PATTERNS:
        m = pat.match(name)
        if m:
            return make(m)
    raise ValueError(f"unknown scoring rule {name!r}; use {', '.join(NAMES)}")
