"""The texts the harness decodes, and the passkey prompts.

* ``prose``: ``data/prose_lighthouse.txt``, an original short story written for this project
  (about 4,400 words, 5.4K SmolLM2 tokens; CC0). Original text, so the model cannot have
  memorised it: predicting it depends on the context (names, numbers and events recur
  across the whole story).
* ``code``: the source of the standard-library module :mod:`pprint` of the running Python,
  read at run time with :func:`inspect.getsourcefile` (about 6K tokens on Python 3.11; the
  exact text depends on the Python version, which reports record).
* passkey prompts: the classic filler ("The grass is green. ...") with a line giving a
  5-digit pass key at a chosen depth (Mohtashami & Jaggi's format), then a completion cue
  ("The pass key is") instead of their question, which the 135M model fails at 90% depth.
"""

from __future__ import annotations

import importlib
import inspect
import random
import sys
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).with_name("data")
CODE_MODULE = "pprint"


@dataclass(frozen=True)
class Text:
    name: str
    text: str
    source: str


def prose() -> Text:
    path = DATA / "prose_lighthouse.txt"
    return Text("prose", path.read_text(encoding="utf-8"), f"freekv_sglang/fidelity/data/{path.name} (original story, CC0)")


def code(module: str = CODE_MODULE) -> Text:
    mod = importlib.import_module(module)
    path = inspect.getsourcefile(mod)
    src = Path(path).read_text(encoding="utf-8")
    ver = ".".join(map(str, sys.version_info[:3]))
    return Text("code", src, f"Python {ver} standard library {module}.py ({path})")


TEXTS = {"prose": prose, "code": code}


def get_text(name: str) -> Text:
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; choose from {sorted(TEXTS)}")
    return TEXTS[name]()


# -- passkey ---------------------------------------------------------------------------
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about the important information there.\n\n")
# The prompt ends in a completion cue, with no question: with "What is the pass key? The pass
# key is" SmolLM2-135M (dense) answers "the pass key that is used to create..." when the key
# sits at 90% depth of a 5K-token prompt; with the bare cue dense answers correctly at 10/50/90%.
QUESTION = "\n\nThe pass key is"


def passkey_key(seed: int) -> str:
    return str(random.Random(seed).randint(10000, 99999))


def passkey_prompt(tokenizer, key: str, depth: float, n_filler: int) -> tuple[list[int], str]:
    """Token ids of a passkey prompt with ``n_filler`` filler sentences groups and the key at ``depth``.

    The key line goes after ``round(depth * n_filler)`` filler groups. Returns ``(ids, prompt)``.
    """
    at = round(depth * n_filler)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    text = INTRO + FILLER * at + needle + FILLER * (n_filler - at) + QUESTION
    return tokenizer(text).input_ids, text


def fillers_for_tokens(tokenizer, target_tokens: int) -> int:
    """Number of filler groups that brings a passkey prompt to about ``target_tokens`` tokens."""
    per = len(tokenizer(FILLER * 10).input_ids) / 10
    fixed = len(tokenizer(INTRO + QUESTION + "The pass key is 12345. Remember it. 12345 is the pass key. ").input_ids)
    return max(1, int((target_tokens - fixed) / per))
