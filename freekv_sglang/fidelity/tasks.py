"""The three fidelity tasks. Every task decodes all rows (:mod:`.rows`) in one batch.

A prompt is prefilled once (batch 1, dense sdpa), its KV cache is repeated to one row per
variant, and every row's FreeKV state is seeded from the prefill. The *last* prompt token is
not prefilled: it is fed as the first decode step, so every token a task scores or generates
comes out of a decode step (sparse attention for FreeKV rows).
"""

from __future__ import annotations

import re
import time

import torch

from . import hook, texts
from .kvcache import preallocated_cache
from .metrics import RetrievalCounts, TeacherForcedAcc, compare_step, first_divergence
from .model import LoadedModel
from .rows import RowSpec


class BatchDecoder:
    """Prefill once, then decode one token per row per step."""

    def __init__(self, lm: LoadedModel, rows: list[RowSpec], prompt: list[int], capacity: int):
        self.lm, self.rows = lm, rows
        self.dec = hook.RowDecoder(rows, lm.n_layers, lm.n_kv_heads)
        self.cache = preallocated_cache(lm.n_layers, capacity)
        t0 = time.time()
        with hook.attach(lm.model, self.dec):
            lm.model(input_ids=torch.tensor([prompt], device=lm.model.device), past_key_values=self.cache,
                     use_cache=True, logits_to_keep=1)
        self.dec.seed()
        for layer in self.cache.layers:
            layer.batch_repeat_interleave(len(rows))
        self.prefill_s = time.time() - t0
        self.decode_s = 0.0
        self.steps = 0

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` ``[B]`` (one per row); return next-token logits ``[B, V]``."""
        t0 = time.time()
        with hook.attach(self.lm.model, self.dec):
            out = self.lm.model(input_ids=tokens[:, None].to(self.lm.model.device), past_key_values=self.cache,
                                use_cache=True)
        logits = out.logits[:, -1].float().cpu()
        self.decode_s += time.time() - t0
        self.steps += 1
        return logits

    def retrieval(self) -> list[RetrievalCounts]:
        out = []
        for r in range(len(self.rows)):
            c = RetrievalCounts()
            c.add_sequence(self.dec.layer_stats(r))
            out.append(c)
        return out


def _full_forward_logits(lm: LoadedModel, ids: list[int], keep: int) -> torch.Tensor:
    """Plain (sdpa, no FreeKV) logits of the last ``keep`` positions: ``[keep, V]``."""
    out = lm.model(input_ids=torch.tensor([ids], device=lm.model.device), use_cache=False, logits_to_keep=keep)
    return out.logits[0].float().cpu()


def teacher_forced(lm: LoadedModel, rows: list[RowSpec], ids: list[int], n_prefill: int, max_steps: int | None,
                   check_dense: bool = True, log=print) -> dict:
    """Prefill ``ids[:n_prefill]``, then feed the true tokens one by one.

    Step ``s`` feeds ``ids[n_prefill + s]`` (context ``n_prefill + s + 1``) and scores the
    prediction of ``ids[n_prefill + s + 1]``.
    """
    steps = len(ids) - 1 - n_prefill
    if max_steps is not None:
        steps = min(steps, max_steps)
    if steps < 1:
        raise ValueError(f"text of {len(ids)} tokens is too short for a prefill of {n_prefill}")
    bd = BatchDecoder(lm, rows, ids[:n_prefill], n_prefill + steps + 1)
    acc = TeacherForcedAcc(len(rows))
    dense_logits = []
    for s in range(steps):
        tok = torch.full((len(rows),), ids[n_prefill + s], dtype=torch.long)
        logits = bd.step(tok)
        acc.add(logits, ids[n_prefill + s + 1])
        if check_dense:
            dense_logits.append(logits[0].clone())
        if (s + 1) % 250 == 0 or s + 1 == steps:
            log(f"    step {s + 1}/{steps} ({bd.decode_s / bd.steps:.2f} s/step); top-1 agreement "
                + " ".join(f"{r.label}={float(acc.agree[i] / acc.steps):.3f}" for i, r in enumerate(rows) if i))
    result = {
        "tokens": len(ids), "prefill": n_prefill, "steps": steps,
        "context_first": n_prefill + 1, "context_last": n_prefill + steps,
        "prefill_s": bd.prefill_s, "decode_s_per_step": bd.decode_s / steps,
        "rows": [acc.row(r) | bd.retrieval()[r].summary() for r in range(len(rows))],
    }
    if check_dense:
        ref = _full_forward_logits(lm, ids[: n_prefill + steps], steps)
        dl = torch.stack(dense_logits)
        agree = (dl.argmax(-1) == ref.argmax(-1)).double().mean()
        kl = torch.stack([compare_step(torch.stack([ref[i], dl[i]]))[1][1] for i in range(steps)])
        result["dense_vs_full_forward"] = {
            "top1_agreement": float(agree), "max_abs_logit_diff": float((dl - ref).abs().max()),
            "kl_mean": float(kl.mean()),
        }
        log("    dense decode vs one full forward: " + ", ".join(f"{k} {v:.3g}" for k, v in result["dense_vs_full_forward"].items()))
    return result


def teacher_forced_top1(lm: LoadedModel, rows: list[RowSpec], ids: list[int], n_prefill: int,
                        steps: int) -> torch.Tensor:
    """Each row's most likely next token along ``ids``: prefill ``ids[:n_prefill]``, then step ``s``
    feeds ``ids[n_prefill + s]`` and predicts ``ids[n_prefill + s + 1]``. Returns int64 ``[rows, steps]``
    (what a server's teacher-forced decode steps 1.. return, see :mod:`freekv_sglang.testing.teacher_forcing`)."""
    if n_prefill + steps >= len(ids):
        raise ValueError(f"{steps} steps after a prefill of {n_prefill} need more than the {len(ids)} tokens given")
    bd = BatchDecoder(lm, rows, ids[:n_prefill], n_prefill + steps + 1)
    out = []
    for s in range(steps):
        tok = torch.full((len(rows),), ids[n_prefill + s], dtype=torch.long)
        out.append(bd.step(tok).argmax(-1))
    return torch.stack(out, dim=1)


def greedy(lm: LoadedModel, rows: list[RowSpec], prompt: list[int], n_new: int, log=print) -> dict:
    """Generate ``n_new`` tokens greedily per row; first divergence from the dense row."""
    bd = BatchDecoder(lm, rows, prompt[:-1], len(prompt) + n_new + 1)
    tok = torch.full((len(rows),), prompt[-1], dtype=torch.long)
    gen = []
    for _ in range(n_new):
        tok = bd.step(tok).argmax(-1)
        gen.append(tok)
    gen = torch.stack(gen, dim=1)  # [B, n_new]
    div = first_divergence(gen)
    return {
        "prompt_tokens": len(prompt), "new_tokens": n_new, "prefill_s": bd.prefill_s,
        "decode_s_per_step": bd.decode_s / n_new,
        "rows": [{"divergence": div[r]} | bd.retrieval()[r].summary() for r in range(len(rows))],
        "dense_text": lm.tokenizer.decode(gen[0]),
    }


_DIGITS = re.compile(r"\d{5}")


def passkey(lm: LoadedModel, rows: list[RowSpec], target_tokens: int, depths, trials: int, n_new: int = 8,
            seed: int = 0, log=print) -> dict:
    """Passkey retrieval at each depth, ``trials`` keys per depth; greedy answer per row."""
    tok = lm.tokenizer
    n_filler = texts.fillers_for_tokens(tok, target_tokens)
    cases = []
    correct = torch.zeros(len(rows))
    for d in depths:
        for t in range(trials):
            key = texts.passkey_key(seed * 100_003 + t * 101 + round(d * 1000))
            ids, _ = texts.passkey_prompt(tok, key, d, n_filler)
            bd = BatchDecoder(lm, rows, ids[:-1], len(ids) + n_new + 1)
            cur = torch.full((len(rows),), ids[-1], dtype=torch.long)
            gen = []
            for _ in range(n_new):
                cur = bd.step(cur).argmax(-1)
                gen.append(cur)
            gen = torch.stack(gen, dim=1)
            answers = [tok.decode(gen[r]) for r in range(len(rows))]
            ok = []
            for r, a in enumerate(answers):
                m = _DIGITS.search(a)
                ok.append(bool(m) and m.group(0) == key)
                correct[r] += ok[-1]
            cases.append({"depth": d, "key": key, "prompt_tokens": len(ids), "dense_answer": answers[0],
                          "correct": ok, "answers": answers})
            log(f"    passkey depth {d:.2f} key {key} ({len(ids)} tokens): dense {answers[0]!r}; "
                f"{sum(ok[1:])}/{len(ok) - 1} FreeKV rows correct")
    n = len(cases)
    return {"target_tokens": target_tokens, "depths": list(depths), "trials": trials, "cases": cases,
            "rows": [{"passkey_accuracy": float(correct[r] / n)} for r in range(len(rows))]}
