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
subS      Quest boxes of sub-pages of S tokens; max over them    2 D P/S       2 D P/S
topnormR  the R keys of largest norm; max_j q . k_j              R D           R D
kmeansR   R k-means centroids of the keys; max_j q . c_j         R D           R D
meanstdA  mean, channel std; q . mu + A |q| . sd                 2 D           2 D
meanabsA  mean, channel max |k - mu|; same score                 2 D           2 D
pcabox    Quest in the eigenbasis of the prompt's keys           2 D           2 D + D^2/q
lowrankR  every key on the top-R principal axes                  P R           P R + D R/q
chanR     every key on its R channels of most energy             P R           P R
boxB[gG]  Quest box + B-bit code per (token/group, channel)      2D + PDB/16G  P D / G
split1    box-free: 1 bit per (token, channel) vs the page mean  2D + PD/16    P D
gridB     every key in B bits on a grid fitted to the prompt     P D B/16      P D
          (``...sink[N]``: to the first N prompt tokens;
          ``...calNAME``: to a calibration text; ``mm``: min/max;
          ``x0``: token 0 left out of the fit)
keyslse   every key exactly (diagnostic)                         P D           P D
qpreNR    Quest keeps the top N pages per KV head, rule R          2 D + R's     2 D, + R's for N
          ranks them (e.g. ``qpre128grid2sink128``)
========  =====================================================  ============  ===================

The ``lse`` rules score ``logsumexp_t q . k_hat_t / sqrt(D)`` over the page's (approximate) keys,
the log of the page's unnormalised attention mass; a ``max`` suffix (``lowrankRmax``, ``chanRmax``,
``boxBmax``, ``split1max``, ``keysmax``) scores the largest logit instead. ``lowrankR``, ``chanR``, ``boxB``,
``split1``, ``gridB`` and ``keyslse`` are ``lse`` rules (the last is a diagnostic: the exact page mass
ranking that ``exact`` fidelity rows use, up to GQA aggregation). ``psplit1`` is ``split1`` in the eigenbasis of the
prompt's keys. The rules with a ``fit`` learn per KV head from the prompt's keys (``pcabox``, ``lowrankR``,
``psplit1``: a basis; ``chanR``: channels; ``gridB``: a grid) and keep it for the request. ``gridBsink`` and
``gridBcalNAME`` fit grids that every request sharing a page also shares (:class:`GridCodes`).

:func:`get_rule` parses every name above. ``quest`` is the default; it equals :func:`~.scores.quest_scores` over
:func:`~.digests.page_digests` exactly. The runtime and the kernels implement ``quest`` and ``grid2sink``
(``--freekv-page-scoring grid2``: the grid fitted on the sink tokens, once the sink is full).

Candidate for the default: ``grid2`` (:class:`GridCodes`). On the needle cases of the fidelity harness it answers
everything dense answers at 1024 and 2048 selected tokens, where quest answers 37% and 68%; it keeps twice
quest's digest size and needs 16x its scoring MACs (docs/FIDELITY.md, "Needle retrieval in natural text").
For a runtime that shares prefix digests between requests, ``grid2sink`` (the grid fitted on the sink's keys)
scores as well on those cases; a per-model grid calibrated on code text does not (docs/FIDELITY.md, "A grid that
does not depend on the request").
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

    def fit_layer(self, keys: torch.Tensor, layer: int | None):
        """:meth:`fit` for ``layer`` of the model (only rules with a per-layer calibration use ``layer``)."""
        return self.fit(keys)

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


def _box_scores(q: torch.Tensor, digests: torch.Tensor) -> torch.Tensor:
    """``q`` ``[B, Hq, C]``, ``digests`` ``[B, Np, Hkv, 2 m, C]`` (max, min pairs) -> max over the ``m``
    boxes of the Quest bound, float32 ``[B, Hq, Np]``."""
    b, hq, c = q.shape
    _, np_, hkv, r2, _ = digests.shape
    g = hq // hkv
    d = digests.float().view(b, np_, hkv, r2 // 2, 2, c).permute(0, 2, 1, 3, 4, 5)  # [B, Hkv, Np, m, 2, C]
    qf = q.float().view(b, hkv, g, 1, 1, 1, c)
    s = torch.maximum(qf * d[:, :, None, :, :, 0:1], qf * d[:, :, None, :, :, 1:2]).sum(-1)  # [B,Hkv,G,Np,m,1]
    return s.squeeze(-1).amax(-1).reshape(b, hq, np_)


@dataclass(frozen=True, repr=False)
class SubPages(ScoringRule):
    """Quest boxes of sub-pages of ``sub`` tokens; a page scores the best of its sub-pages.

    Digest ``[n, Hkv, 2 P/sub, C]``: (max, min) of sub-page 0, then of sub-page 1, ...
    """

    sub: int = 16

    @property
    def name(self):
        return f"sub{self.sub}"

    def digests(self, keys, page_size, ctx=None):
        if page_size % self.sub:
            raise ValueError(f"sub-page {self.sub} must divide the page size {page_size}")
        pg = _pages(keys, page_size)  # [n, P, Hkv, D]
        m = page_size // self.sub
        sp = pg.unflatten(1, (m, self.sub))  # [n, m, sub, Hkv, D]
        box = torch.stack([sp.amax(2), sp.amin(2)], dim=2)  # [n, m, 2, Hkv, D]
        return box.permute(0, 3, 1, 2, 4).flatten(2, 3)  # [n, Hkv, 2m, D]

    def scores(self, q, digests, ctx=None):
        return _box_scores(q, digests)

    def digest_values(self, page_size, head_dim):
        return 2 * head_dim * page_size // self.sub

    def score_macs(self, page_size, head_dim):
        return 2 * head_dim * page_size // self.sub


def _max_dot(q: torch.Tensor, reps: torch.Tensor) -> torch.Tensor:
    """``q`` ``[B, Hq, C]``, ``reps`` ``[B, Np, Hkv, R, C]`` -> ``max_j q . reps_j``, float32 ``[B, Hq, Np]``."""
    b, hq, c = q.shape
    _, np_, hkv, r, _ = reps.shape
    qf = q.float().view(b, hkv, hq // hkv, c)
    s = torch.einsum("bkgc,bpkrc->bkgpr", qf, reps.float())
    return s.amax(-1).reshape(b, hq, np_)


class _RepresentativeKeys(ScoringRule):
    """Rules whose digest is ``r`` key-like vectors per page, scored by ``max_j q . v_j``."""

    r: int

    def scores(self, q, digests, ctx=None):
        return _max_dot(q, digests)

    def digest_values(self, page_size, head_dim):
        return self.r * head_dim

    def score_macs(self, page_size, head_dim):
        return self.r * head_dim


@dataclass(frozen=True, repr=False)
class TopNorm(_RepresentativeKeys):
    """The ``r`` keys of largest norm of each page; score ``max_j q . k_j``."""

    r: int = 4

    @property
    def name(self):
        return f"topnorm{self.r}"

    def digests(self, keys, page_size, ctx=None):
        pg = _pages(keys, page_size).permute(0, 2, 1, 3)  # [n, Hkv, P, D]
        idx = pg.norm(dim=-1).topk(min(self.r, page_size), dim=-1).indices  # [n, Hkv, r]
        return torch.gather(pg, 2, idx[..., None].expand(-1, -1, -1, pg.shape[-1]))


@dataclass(frozen=True, repr=False)
class KMeans(_RepresentativeKeys):
    """``r`` centroids of each page's keys (Lloyd's algorithm, ``iters`` rounds from the strided keys
    ``0, P/r, 2P/r, ...``; an empty cluster keeps its previous centroid); score ``max_j q . c_j``."""

    r: int = 4
    iters: int = 8

    @property
    def name(self):
        return f"kmeans{self.r}"

    def digests(self, keys, page_size, ctx=None):
        pg = _pages(keys, page_size).permute(0, 2, 1, 3)  # [n, Hkv, P, D]
        r = min(self.r, page_size)
        c = pg[:, :, :: page_size // r][:, :, :r].clone()  # [n, Hkv, r, D]
        for _ in range(self.iters):
            assign = torch.cdist(pg, c).argmin(-1)  # [n, Hkv, P]
            onehot = torch.nn.functional.one_hot(assign, r).float()  # [n, Hkv, P, r]
            cnt = onehot.sum(2)  # [n, Hkv, r]
            tot = torch.einsum("nhpr,nhpd->nhrd", onehot, pg)
            c = torch.where(cnt[..., None] > 0, tot / cnt.clamp_min(1)[..., None], c)
        return c


@dataclass(frozen=True, repr=False)
class MeanSpread(ScoringRule):
    """Mean key and a per-channel spread: ``q . mu + alpha * sum_d |q_d| spread_d``.

    ``spread="std"``: the channel standard deviation; ``"abs"``: ``max_t |k_td - mu_d|`` (with
    ``alpha = 1`` an upper bound of ``q . k``, a box centred on the mean).
    """

    alpha: float = 1.0
    spread: str = "std"

    @property
    def name(self):
        return f"mean{self.spread}{self.alpha:g}"

    def digests(self, keys, page_size, ctx=None):
        pg = _pages(keys, page_size)  # [n, P, Hkv, D]
        mu = pg.mean(1)
        if self.spread == "std":
            sp = pg.std(1, unbiased=False)
        else:
            sp = (pg - mu[:, None]).abs().amax(1)
        return torch.stack([mu, sp], dim=2)  # [n, Hkv, 2, D]

    def scores(self, q, digests, ctx=None):
        b, hq, c = q.shape
        _, np_, hkv, _, _ = digests.shape
        qf = q.float().view(b, hkv, hq // hkv, 1, c)
        mu = digests[:, :, :, 0].float().permute(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, Np, C]
        sp = digests[:, :, :, 1].float().permute(0, 2, 1, 3)[:, :, None]
        s = (qf * mu).sum(-1) + self.alpha * (qf.abs() * sp).sum(-1)
        return s.reshape(b, hq, np_)

    def digest_values(self, page_size, head_dim):
        return 2 * head_dim

    def score_macs(self, page_size, head_dim):
        return 2 * head_dim


def _pca(keys: torch.Tensor):
    """Per KV head: mean ``[Hkv, D]`` and eigenvectors of the key covariance, columns by decreasing
    eigenvalue ``[Hkv, D, D]`` (float32)."""
    k = keys.float().transpose(0, 1)  # [Hkv, n, D]
    mu = k.mean(1)
    kc = k - mu[:, None]
    cov = kc.transpose(1, 2) @ kc / max(k.shape[1], 1)
    _, vec = torch.linalg.eigh(cov)  # ascending
    return mu, vec.flip(-1)


class PcaBox(ScoringRule):
    """Quest in the eigenbasis ``U`` of the prompt's key covariance: digests are the box of ``k U`` and a
    query is scored as ``q U`` (``U`` orthogonal, so the bound still holds; a box aligned with the
    keys' principal axes is tighter)."""

    name = "pcabox"

    def fit(self, keys):
        return _pca(keys)[1]  # [Hkv, D, D]

    def digests(self, keys, page_size, ctx=None):
        rot = torch.einsum("nhd,hde->nhe", keys.float(), ctx)
        return page_digests(rot, page_size)

    def scores(self, q, digests, ctx=None):
        b, hq, d = q.shape
        hkv = digests.shape[2]
        u = ctx if ctx.dim() == 4 else ctx[None].expand(b, -1, -1, -1)  # [B, Hkv, D, D]
        qr = torch.einsum("bkgd,bkde->bkge", q.float().view(b, hkv, hq // hkv, d), u).reshape(b, hq, d)
        return quest_scores(qr, digests)

    def digest_values(self, page_size, head_dim):
        return 2 * head_dim

    def score_macs(self, page_size, head_dim):
        return 2 * head_dim


@dataclass(frozen=True, repr=False)
class LowRank(ScoringRule):
    """Every key of the page kept in ``r`` coordinates on the top principal axes of the prompt's keys;
    a page scores ``logsumexp_t`` (``reduce="lse"``) or ``max_t`` (``"max"``) of the approximate
    logits ``(q U) . ((k_t - mu) U) / sqrt(D)`` (``q . mu`` is the same for every page and dropped)."""

    r: int = 8
    reduce: str = "lse"

    @property
    def name(self):
        return f"lowrank{self.r}" + ("" if self.reduce == "lse" else self.reduce)

    def fit(self, keys):
        mu, vec = _pca(keys)
        return mu, vec[:, :, : self.r].contiguous()  # [Hkv, D], [Hkv, D, r]

    def digests(self, keys, page_size, ctx=None):
        mu, u = ctx
        coords = torch.einsum("nhd,hdr->nhr", keys.float() - mu, u)  # [n, Hkv, r]
        pg = _pages(coords, page_size)  # [n_full, P, Hkv, r]
        return pg.permute(0, 2, 1, 3)  # [n_full, Hkv, P, r]

    def scores(self, q, digests, ctx=None):
        mu, u = ctx
        b, hq, d = q.shape
        hkv = digests.shape[2]
        if u.dim() == 3:
            u = u[None].expand(b, -1, -1, -1)
        qp = torch.einsum("bkgd,bkdr->bkgr", q.float().view(b, hkv, hq // hkv, d), u)  # [B, Hkv, G, r]
        logits = torch.einsum("bkgr,bpktr->bkgpt", qp, digests.float()) / math.sqrt(d)
        s = torch.logsumexp(logits, -1) if self.reduce == "lse" else logits.amax(-1)
        return s.reshape(b, hq, -1)

    def digest_values(self, page_size, head_dim):
        return page_size * self.r

    def score_macs(self, page_size, head_dim):
        return page_size * self.r


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

_CALIBRATION: dict = {}  # calibration name -> per-layer keys [n, Hkv, D] (set_calibration)


def set_calibration(name: str, keys_per_layer) -> None:
    """Keys ``[n, Hkv, D]`` of every layer of the model, from a calibration text, for the ``gridBcalNAME``
    rules (a grid fixed per model: the same for every request)."""
    if not re.fullmatch(r"[a-z]+", name):
        raise ValueError(f"calibration name {name!r}: lower-case letters only")
    _CALIBRATION[name] = [k.detach().float().cpu() for k in keys_per_layer]


def calibration_keys(name: str, layer: int) -> torch.Tensor:
    """The keys :func:`set_calibration` stored for ``layer`` under ``name``."""
    if name not in _CALIBRATION:
        raise KeyError(f"no calibration {name!r} set (scoring_rules.set_calibration); have {sorted(_CALIBRATION)}")
    return _CALIBRATION[name][layer]


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
    * ``"cal"`` (``gridBcalNAME``): keys of a calibration text, per layer (:func:`set_calibration`): one grid
      per model. Needs the layer: :meth:`fit_layer`.
    """

    bits: int = 2
    fit_on: str = "prompt"
    minmax: bool = False
    skip0: bool = False
    sink: int = SINK_TOKENS
    cal: str = ""

    @property
    def name(self):
        src = {"prompt": "", "sink": "sink" + (str(self.sink) if self.sink != SINK_TOKENS else ""),
               "cal": "cal" + self.cal}[self.fit_on]
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
        if self.fit_on == "cal":
            raise ValueError(f"{self.name} is fitted per layer: use fit_layer(keys, layer)")
        return self.grid(keys[: self.sink] if self.fit_on == "sink" else keys)

    def fit_layer(self, keys, layer):
        if self.fit_on != "cal":
            return self.fit(keys)
        lo, hi = self.grid(calibration_keys(self.cal, layer))
        return lo.to(keys.device), hi.to(keys.device)

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


@dataclass(frozen=True, repr=False)
class Channels(ScoringRule):
    """Every key of the page on ``r`` channels only (the ``r`` of largest mean ``k_d^2`` over the prompt's
    keys, per KV head); a page scores ``lse`` over its tokens of ``q_S . k_S / sqrt(D)``."""

    r: int = 8
    reduce: str = "lse"

    @property
    def name(self):
        return f"chan{self.r}" + ("" if self.reduce == "lse" else self.reduce)

    def fit(self, keys):
        energy = keys.float().pow(2).mean(0)  # [Hkv, D]
        return energy.topk(self.r, dim=-1).indices.sort(-1).values  # [Hkv, r]

    def digests(self, keys, page_size, ctx=None):
        sel = torch.gather(keys.float(), 2, ctx[None].expand(keys.shape[0], -1, -1))  # [n, Hkv, r]
        return _pages(sel, page_size).permute(0, 2, 1, 3)  # [n, Hkv, P, r]

    def scores(self, q, digests, ctx=None):
        b, hq, d = q.shape
        hkv = digests.shape[2]
        idx = ctx if ctx.dim() == 3 else ctx[None].expand(b, -1, -1)  # [B, Hkv, r]
        qs = torch.gather(q.float().view(b, hkv, hq // hkv, d), 3, idx[:, :, None].expand(-1, -1, hq // hkv, -1))
        logits = torch.einsum("bkgr,bpktr->bkgpt", qs, digests.float()) / math.sqrt(d)
        return _reduce_tokens(logits, self.reduce).reshape(b, hq, -1)

    def digest_values(self, page_size, head_dim):
        return page_size * self.r

    def score_macs(self, page_size, head_dim):
        return page_size * self.r


@dataclass(frozen=True, repr=False)
class SplitCodes(ScoringRule):
    """One bit per (token, channel): whether ``k[t, d]`` lies above the page's channel mean; each side is
    reconstructed by its conditional mean (``hi[d]``, ``lo[d]``, the 1-bit quantizer of least squared error
    for that split). A page scores ``lse`` over its tokens of ``q . k_hat_t / sqrt(D)``. With ``rotate``, keys
    and queries are first rotated into the eigenbasis of the prompt's key covariance.

    Digest ``[n, Hkv, 2 + P, D]``: hi, lo, then the bits (``P D / 8`` bytes packed)."""

    rotate: bool = False
    reduce: str = "lse"

    @property
    def name(self):
        return ("p" if self.rotate else "") + "split1" + ("" if self.reduce == "lse" else self.reduce)

    def fit(self, keys):
        return _pca(keys)[1] if self.rotate else None

    def digests(self, keys, page_size, ctx=None):
        if self.rotate:
            keys = torch.einsum("nhd,hde->nhe", keys.float(), ctx)
        pg = _pages(keys, page_size)  # [n, P, Hkv, D]
        mu = pg.mean(1, keepdim=True)
        up = pg >= mu
        cnt_up = up.float().sum(1)
        hi = torch.where(up, pg, 0).sum(1) / cnt_up.clamp_min(1)
        lo = torch.where(~up, pg, 0).sum(1) / (page_size - cnt_up).clamp_min(1)
        lo = torch.where(cnt_up == page_size, hi, lo)
        return torch.cat([hi[:, :, None], lo[:, :, None], up.float().permute(0, 2, 1, 3)], dim=2)

    def scores(self, q, digests, ctx=None):
        b, hq, d = q.shape
        hkv = digests.shape[2]
        qf = q.float().view(b, hkv, hq // hkv, d)
        if self.rotate:
            u = ctx if ctx.dim() == 4 else ctx[None].expand(b, -1, -1, -1)
            qf = torch.einsum("bkgd,bkde->bkge", qf, u)
        dig = digests.float()
        hi, lo, bit = dig[:, :, :, 0:1], dig[:, :, :, 1:2], dig[:, :, :, 2:]
        k_hat = lo + bit * (hi - lo)
        logits = torch.einsum("bkgd,bpktd->bkgpt", qf, k_hat) / math.sqrt(d)
        return _reduce_tokens(logits, self.reduce).reshape(b, hq, -1)

    def digest_values(self, page_size, head_dim):
        return 2 * head_dim + page_size * head_dim / 16

    def score_macs(self, page_size, head_dim):
        return page_size * head_dim


@dataclass(frozen=True, repr=False)
class QuestPrefiltered(ScoringRule):
    """Two stages: Quest's bounds (mean over the GQA group) keep the top ``n`` pages of each KV head, and only
    those are scored by ``inner`` (e.g. ``grid2sink128``); every other page ranks below them, in Quest's order.
    A kernel would then read ``inner``'s digest of ``n`` pages per KV head instead of every candidate's.

    The rule sees every page of the history, so the ``n`` kept pages may include sink and window pages (which
    are never candidates): a kernel that ranks only candidates keeps at least as many. Digest ``[n, Hkv, 2 + R,
    D]``: Quest's max and min, then ``inner``'s ``R`` rows."""

    n: int
    inner: ScoringRule

    @property
    def name(self):
        return f"qpre{self.n}{self.inner.name}"

    def fit(self, keys):
        return self.inner.fit(keys)

    def fit_layer(self, keys, layer):
        return self.inner.fit_layer(keys, layer)

    def digests(self, keys, page_size, ctx=None):
        box = page_digests(keys, page_size).float()
        return torch.cat([box, self.inner.digests(keys, page_size, ctx).float()], dim=2)

    def scores(self, q, digests, ctx=None):
        b, hq, _ = q.shape
        hkv = digests.shape[2]
        quest = quest_scores(q, digests[:, :, :, :2])  # [B, Hq, Np]
        per_kv = quest.view(b, hkv, hq // hkv, -1).mean(2)  # [B, Hkv, Np]
        keep = torch.zeros_like(per_kv, dtype=torch.bool)
        keep.scatter_(-1, per_kv.topk(min(self.n, per_kv.shape[-1]), dim=-1).indices, True)
        keep = keep.repeat_interleave(hq // hkv, dim=1)  # [B, Hq, Np]
        inner = self.inner.scores(q, digests[:, :, :, 2:], ctx)
        return torch.where(keep, inner, quest - OUTRANKED)

    def digest_values(self, page_size, head_dim):
        return 2 * head_dim + self.inner.digest_values(page_size, head_dim)

    def score_macs(self, page_size, head_dim):
        return 2 * head_dim  # per candidate page; plus inner's MACs for the n kept pages only


#: What a page outside a prefilter's kept pages loses, so that every kept page ranks above it
OUTRANKED = 1.0e4


_PATTERNS = (
    (re.compile(r"sub(\d+)$"), lambda m: SubPages(int(m.group(1)))),
    (re.compile(r"topnorm(\d+)$"), lambda m: TopNorm(int(m.group(1)))),
    (re.compile(r"kmeans(\d+)$"), lambda m: KMeans(int(m.group(1)))),
    (re.compile(r"lowrank(\d+)(max)?$"), lambda m: LowRank(int(m.group(1)), m.group(2) or "lse")),
    (re.compile(r"keys(lse|max)$"), lambda m: TokenKeys(m.group(1))),
    (re.compile(r"box(\d+)(?:g(\d+))?(max)?$"),
     lambda m: BoxCodes(int(m.group(1)), m.group(3) or "lse", int(m.group(2) or 1))),
    (re.compile(r"grid(\d+)(?:(sink)(\d*)|cal([a-z]+?))?(mm)?(x0)?$"),
     lambda m: GridCodes(int(m.group(1)), "sink" if m.group(2) else "cal" if m.group(4) else "prompt",
                         bool(m.group(5)), bool(m.group(6)), int(m.group(3) or SINK_TOKENS), m.group(4) or "")),
    (re.compile(r"chan(\d+)(max)?$"), lambda m: Channels(int(m.group(1)), m.group(2) or "lse")),
    (re.compile(r"(p?)split1(max)?$"), lambda m: SplitCodes(bool(m.group(1)), m.group(2) or "lse")),
    (re.compile(r"meanstd([\d.]+)$"), lambda m: MeanSpread(float(m.group(1)), "std")),
    (re.compile(r"meanabs([\d.]+)$"), lambda m: MeanSpread(float(m.group(1)), "abs")),
    (re.compile(r"qpre(\d+)(.+)$"), lambda m: QuestPrefiltered(int(m.group(1)), get_rule(m.group(2)))),
)
RULES = {"quest": Quest(), "pcabox": PcaBox()}
NAMES = ("quest", "pcabox", "subS", "topnormR", "kmeansR", "meanstdA", "meanabsA", "lowrankR[max]", "chanR[max]",
         "boxB[gG][max]", "[p]split1[max]",
         "gridB[sink[N]|calNAME][mm][x0]", "keys{lse,max}", "qpreNRULE")


def get_rule(name: str) -> ScoringRule:
    """The rule called ``name`` (the module docstring lists them)."""
    if name in RULES:
        return RULES[name]
    for pat, make in _PATTERNS:
        m = pat.match(name)
        if m:
            return make(m)
    raise ValueError(f"unknown scoring rule {name!r}; use {', '.join(NAMES)}")
