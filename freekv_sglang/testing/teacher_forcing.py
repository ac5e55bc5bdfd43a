"""Teacher forcing through a running SGLang server's decode path.

A server generates from its own tokens, so to score a model's next-token choice along a *given* text
every decode step must be fed the text's token while the model's own preference is still read out.
:class:`TeacherForcingProcessor` (an SGLang custom logit processor; start the server with
``--enable-custom-logit-processor``) adds a large bias ``B`` to the logit of the text's next token
at every step, so greedy sampling picks it; the request asks for the two most likely tokens with
their log-probabilities (computed after the bias). Log-softmax shifts every logit by the same
amount, so for the forced token ``f`` and the best other token ``j``

    logp_f - logp_j = (l_f + B) - l_j,

and the model's own top-1 was ``f`` exactly when ``logp_f - logp_j > B``.

Step 0 of a request comes from the prefill (dense in every mode); steps 1.. come from decode steps.
"""

from __future__ import annotations

from typing import Any

from freekv_sglang import compat

try:  # the server imports this module to unpickle the processor; clients only need the helpers
    CustomLogitProcessor = compat.custom_logit_processor_class()
except ImportError:  # pragma: no cover - SGLang missing: only the pure helpers below are usable
    CustomLogitProcessor = object

#: Logit bias that forces a token (logits of these models stay within about +-50).
BIAS = 1000.0


class TeacherForcingProcessor(CustomLogitProcessor):
    """Adds ``BIAS`` to ``tokens[step]``, where ``step`` is the number of tokens the request has
    generated so far (custom params: ``{"tokens": [...]}``)."""

    def __call__(self, logits, custom_param_list: list[dict[str, Any]] | None = None):
        for i, params in enumerate(custom_param_list or ()):
            if not params or "tokens" not in params:
                continue
            step = len(params["__req__"].output_ids)
            tokens = params["tokens"]
            if step < len(tokens):
                logits[i, tokens[step]] += params.get("bias", BIAS)
        return logits


def request_body(prompt: list[int], forced: list[int], top: int = 2) -> dict:
    """``/generate`` body: prompt ``prompt`` then exactly the tokens ``forced``, returning the top
    ``top`` log-probabilities of every step. Needs ``--enable-custom-logit-processor``."""
    return {
        "input_ids": list(prompt),
        "sampling_params": {"max_new_tokens": len(forced), "temperature": 0, "ignore_eos": True,
                            "custom_params": {"tokens": list(forced), "bias": BIAS}},
        "custom_logit_processor": TeacherForcingProcessor.to_str(),
        "return_logprob": True,
        "top_logprobs_num": top,
    }


def model_top1(resp: dict, forced: list[int], bias: float = BIAS) -> list[int]:
    """The model's own most likely token at each step of a teacher-forced response (see the module
    docstring). Raises ``ValueError`` if the server did not generate exactly ``forced``."""
    meta = resp.get("meta_info", {})
    out = [int(t[1]) for t in meta.get("output_token_logprobs") or ()]
    if out != list(forced):
        first = next((i for i, (a, b) in enumerate(zip(out, forced)) if a != b), min(len(out), len(forced)))
        raise ValueError(f"the server generated {len(out)} tokens that differ from the forced ones at step {first}: "
                         "is --enable-custom-logit-processor on (and the overlap scheduler off)?")
    top1 = []
    for f, step in zip(forced, meta["output_top_logprobs"]):
        ranked = sorted(((float(lp), int(tok)) for lp, tok, *_ in step), reverse=True)
        others = [(lp, tok) for lp, tok in ranked if tok != f]
        lp_f = next(lp for lp, tok in ranked if tok == f)
        top1.append(f if not others or lp_f - others[0][0] > bias else others[0][1])
    return top1


def agreement(a: list[int], b: list[int]) -> float:
    """Share of positions where two top-1 sequences agree."""
    if len(a) != len(b) or not a:
        raise ValueError(f"sequences of {len(a)} and {len(b)} tokens")
    return sum(x == y for x, y in zip(a, b)) / len(a)


def agreement_difference(a1: list[int], b1: list[int], a2: list[int], b2: list[int]) -> tuple[float, float]:
    """``agreement(a1, b1) - agreement(a2, b2)`` over the same steps, and its standard error.

    Per step ``d_i = [a1_i == b1_i] - [a2_i == b2_i]`` (in -1, 0, 1); returns ``(mean d, sd(d) / sqrt(n))``.
    Only the steps where the two pairs disagree differently carry noise: rounding flips of the top-1
    (bf16 against float32) make a difference of ``1 / n`` each, with either sign, so two agreement rates
    that differ by less than a few standard errors are equal within that noise.
    """
    n = len(a1)
    if not n or any(len(x) != n for x in (b1, a2, b2)):
        raise ValueError(f"sequences of {[len(x) for x in (a1, b1, a2, b2)]} tokens")
    d = [(x == y) - (u == v) for x, y, u, v in zip(a1, b1, a2, b2)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(n - 1, 1)
    return mean, (var / n) ** 0.5
