"""Keys of a calibration text for the scoring rules fitted once per model (``gridBcalNAME``).

A rule ``grid2calcode`` scores every request with a grid fitted on the keys the model produces for the
first :data:`CAL_TOKENS` tokens of the harness text ``code`` (:mod:`.texts`), per layer, KV head and
channel: a grid that no request changes. :func:`calibrate` prefills each named text once (dense, no
FreeKV rows) and hands its post-RoPE keys to :func:`~freekv_sglang.algorithm.scoring_rules.set_calibration`.
"""

from __future__ import annotations

import torch

from ..algorithm.scoring_rules import GridCodes, get_rule, set_calibration
from . import texts
from .kvcache import preallocated_cache
from .model import LoadedModel

CAL_TOKENS = 4096


def calibration_names(rule_names) -> list[str]:
    """The calibration texts the rules named in ``rule_names`` (``rule`` or ``rule/aggregation``) need."""
    out = []
    for name in rule_names:
        rule = get_rule(name.partition("/")[0])
        if isinstance(rule, GridCodes) and rule.fit_on == "cal" and rule.cal not in out:
            out.append(rule.cal)
    return out


def prompt_keys(lm: LoadedModel, ids: list[int]) -> list[torch.Tensor]:
    """Post-RoPE keys ``[n, Hkv, D]`` of every layer after a dense prefill of ``ids``."""
    cache = preallocated_cache(lm.n_layers, len(ids))
    with torch.inference_mode():
        lm.model(input_ids=torch.tensor([ids], device=lm.model.device), past_key_values=cache, use_cache=True,
                 logits_to_keep=1)
    return [layer.keys[0].transpose(0, 1).contiguous() for layer in cache.layers]


def calibrate(lm: LoadedModel, names, tokens: int = CAL_TOKENS, log=print) -> dict:
    """Set the calibration keys of every text in ``names`` (harness texts); returns ``{name: source}``."""
    out = {}
    for name in names:
        t = texts.get_text(name)
        ids = lm.tokenizer(t.text).input_ids[:tokens]
        set_calibration(name, prompt_keys(lm, ids))
        out[name] = f"{t.source}, first {len(ids)} tokens"
        log(f"calibration {name}: keys of the first {len(ids)} tokens of {t.source}")
    return out
