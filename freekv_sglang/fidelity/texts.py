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


# -- needles in natural text -------------------------------------------------------------
# Facts, lists and questions written for this harness (original; CC0 like the stories). Each fact:
# (sentence hidden in the text, question, answer cue that ends the prompt, answer).
FACTS = (
    ("The ferry's registration number is 48213.", "What is the ferry's registration number?",
     "The ferry's registration number is", "48213"),
    ("The code for the padlock on the boathouse is 3716.", "What is the code for the padlock on the boathouse?",
     "The code for the padlock on the boathouse is", "3716"),
    ("The doctor who came out on the mail boat was called Orrin Vask.", "What was the doctor who came out on "
     "the mail boat called?", "The doctor who came out on the mail boat was called", "Orrin Vask"),
    ("The mooring fee at the north quay was 275 shillings a season.", "What was the mooring fee at the north quay?",
     "The mooring fee at the north quay was", "275"),
    ("The signal flag of the pilot cutter was a green cross on an orange field.", "What was the signal flag of "
     "the pilot cutter?", "The signal flag of the pilot cutter was a", "green cross"),
)
# Key-value lookups: a board of berths (name, number), one of them asked.
KV_INTRO = "On the wall of the harbour office hung a board with the berth of every boat: "
KV_PAIRS = (("Alder", "4417"), ("Birch", "9023"), ("Cedar", "1658"), ("Dunmore", "7302"), ("Elm", "2849"),
            ("Fenwick", "6135"), ("Garnet", "5570"), ("Heron", "3981"))
KV_QUESTION = "On the board in the harbour office, what was the berth of {key}?"
KV_CUE = "{key}:"  # SmolLM2-135M answers "The berth of Birch was" less often than "Birch:" (a copy cue)
NEEDLE_KINDS = ("fact", "facts", "kv")


@dataclass(frozen=True)
class NeedleCase:
    """One retrieval prompt: natural text with a needle, a question and an answer cue.

    ``spans``: character spans of ``prompt`` holding what the answer is copied from (the asked
    fact, or the asked key-value pair); the diagnostics locate its tokens and pages from them.
    """

    name: str
    kind: str
    depth: float
    prompt: str
    answer: str
    spans: tuple


def needle_paragraphs(tokenizer, target_tokens: int) -> list[str]:
    """The last paragraphs of the orchard essay followed by the lighthouse story that fit in
    ``target_tokens`` tokens (the story alone is 5.4K tokens, both together 7.5K)."""
    paras = (DATA / "prose_orchard.txt").read_text(encoding="utf-8").split("\n\n")
    paras += prose().text.split("\n\n")
    paras = [p.strip() for p in paras if p.strip()]
    out, total = [], 0
    for p in reversed(paras):
        n = len(tokenizer(p + "\n\n").input_ids)
        if total + n > target_tokens:
            break
        out.insert(0, p)
        total += n
    return out


def _sentence_breaks(text: str) -> list[int]:
    """Character offsets where a new sentence starts (after ``. ``, ``! ``, ``? `` or a paragraph break)."""
    import re

    return [m.end() for m in re.finditer(r'[.!?]"?\s+(?=["A-Z])', text)]


def _insert(body: str, depth: float, sentence: str, taken=()) -> tuple[str, int]:
    """Insert ``sentence`` at the sentence start nearest ``depth`` of ``body`` (avoiding offsets in ``taken``).
    Returns ``(new body, offset of the sentence)``."""
    breaks = [b for b in _sentence_breaks(body) if b not in taken] or [len(body)]
    at = min(breaks, key=lambda b: abs(b - depth * len(body)))
    return body[:at] + sentence + " " + body[at:], at


def needle_case(tokenizer, kind: str, target_tokens: int, depth: float, item: int) -> NeedleCase:
    """A ``kind`` (:data:`NEEDLE_KINDS`) prompt of about ``target_tokens`` tokens with its needle at ``depth``
    (named ``kind@depth/target_tokens#item``).

    * ``fact``: one fact (``FACTS[item]``) hidden in the text; asked.
    * ``facts``: three facts, the asked one (``FACTS[item]``) at ``depth``, two others at ``depth + 1/3`` and
      ``depth + 2/3`` (mod 1).
    * ``kv``: the board of berths (8 name-number pairs) at ``depth``; the berth of ``KV_PAIRS[item]`` asked.
    """
    reserve = 160  # needles, question and cue
    body = "\n\n".join(needle_paragraphs(tokenizer, target_tokens - reserve))
    if kind == "fact" or kind == "facts":
        fact = FACTS[item % len(FACTS)]
        inserts = [(depth, fact[0], True)]
        if kind == "facts":
            for j, off in ((1, 1 / 3), (2, 2 / 3)):
                other = FACTS[(item + j) % len(FACTS)]
                inserts.append(((depth + off) % 1.0, other[0], False))
        question, cue, answer = fact[1], fact[2], fact[3]
    elif kind == "kv":
        key, answer = KV_PAIRS[item % len(KV_PAIRS)]
        board = KV_INTRO + ", ".join(f"{k}: {v}" for k, v in KV_PAIRS) + "."
        inserts = [(depth, board, True)]
        question, cue = KV_QUESTION.format(key=key), KV_CUE.format(key=key)
    else:
        raise ValueError(f"unknown needle kind {kind!r}; choose from {NEEDLE_KINDS}")
    # insert from the deepest position up so that earlier offsets stay valid
    placed = []
    for d, sentence, asked in sorted(inserts, key=lambda x: -x[0]):
        body, at = _insert(body, d, sentence, taken=[p for p, _ in placed])
        placed = [(p + (len(sentence) + 1 if p >= at else 0), s) for p, s in placed] + [(at, (sentence, asked))]
    prompt = body + f"\n\nQuestion: {question}\nAnswer: {cue}"
    spans = []
    for at, (sentence, asked) in placed:
        if not asked:
            continue
        if kind == "kv":  # the asked pair only
            pair = f"{key}: {answer}"
            s = prompt.index(pair, at)
            spans.append((s, s + len(pair)))
        else:
            spans.append((at, at + len(sentence)))
    name = f"{kind}@{depth:g}/{target_tokens}#{item}"
    return NeedleCase(name, kind, depth, prompt, answer, tuple(spans))
