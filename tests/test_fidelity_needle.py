"""Needle cases and their diagnostic without a model (CPU): the prompts (texts.needle_case), the case grid,
the ``+rule=`` / ``+agg=`` row suffixes, the needle-page ranking, merging split runs, and the report."""

import math
import re
from types import SimpleNamespace

import pytest
import torch

from freekv_sglang.fidelity import needle, report, texts
from freekv_sglang.fidelity.rows import build_rows


class WordTokenizer:
    """Stand-in for a tokenizer: words, punctuation marks and runs of white space are tokens."""

    _tok = re.compile(r"\w+|[^\w\s]|\s+")

    def __call__(self, text, return_offsets_mapping=False):
        spans = [(m.start(), m.end()) for m in self._tok.finditer(text)]
        out = SimpleNamespace(input_ids=[hash(text[a:b]) % 50000 for a, b in spans])
        if return_offsets_mapping:
            out.offset_mapping = spans
        return out


TOK = WordTokenizer()


# ---- prompts -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", texts.NEEDLE_KINDS)
@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_needle_case_prompt(kind, depth):
    c = texts.needle_case(TOK, kind, 3000, depth, item=2)
    assert c.kind == kind and c.depth == depth and c.name == f"{kind}@{depth:g}/3000#2"
    n_tok = len(TOK(c.prompt).input_ids)
    assert 2000 < n_tok <= 3000
    assert c.prompt.count("\n\nQuestion: ") == 1 and "\nAnswer: " in c.prompt
    assert len(c.spans) == 1
    s, e = c.spans[0]
    body_end = c.prompt.index("\n\nQuestion: ")
    assert e <= body_end  # the needle is in the text, not in the question
    assert abs(s / body_end - depth) < 0.1
    if kind == "kv":
        key, answer = texts.KV_PAIRS[2]
        assert c.prompt[s:e] == f"{key}: {answer}" and c.answer == answer
        assert c.prompt.endswith(texts.KV_CUE.format(key=key))
        board = texts.KV_INTRO + ", ".join(f"{k}: {v}" for k, v in texts.KV_PAIRS) + "."
        assert c.prompt.count(board) == 1 and c.prompt.index(board) < s
    else:
        sentence, question, cue, answer = texts.FACTS[2]
        assert c.prompt[s:e] == sentence and c.answer == answer and answer in sentence
        assert c.prompt.endswith(f"Question: {question}\nAnswer: {cue}")
        assert answer not in c.prompt[e:]  # only the needle holds the answer
        others = [f[0] for i, f in enumerate(texts.FACTS) if i != 2]
        n_others = sum(c.prompt.count(o) for o in others)
        assert n_others == (2 if kind == "facts" else 0)
        if kind == "facts":  # the distractors are facts 3 and 4, at depth + 1/3 and + 2/3 (mod 1)
            for j, off in ((3, 1 / 3), (4, 2 / 3)):
                at = c.prompt.index(texts.FACTS[j][0])
                assert abs(at / body_end - (depth + off) % 1.0) < 0.1


def test_needle_paragraphs_fit_and_end_with_the_story():
    short = texts.needle_paragraphs(TOK, 1000)
    long = texts.needle_paragraphs(TOK, 20000)
    assert sum(len(TOK(p + "\n\n").input_ids) for p in short) <= 1000
    assert long[-len(short):] == short  # the last paragraphs of the same text
    story = [p.strip() for p in texts.prose().text.split("\n\n") if p.strip()]
    assert long[-1] == story[-1] and len(long) > len(story)  # the orchard essay comes first


def test_unknown_kind_fails():
    with pytest.raises(ValueError, match="needle kind"):
        texts.needle_case(TOK, "riddle", 2000, 0.5, 0)


def test_case_grid_and_items():
    cs = needle.cases(TOK, ["fact", "kv"], [2000, 3000], [0.1, 0.5, 0.9])
    assert [c.name.split("#")[0] for c in cs[:3]] == ["fact@0.1/2000", "fact@0.5/2000", "fact@0.9/2000"]
    assert len(cs) == 12 and len({c.name for c in cs}) == 12
    # the item a case asks depends on the case alone: a run split over processes asks the same
    alone = needle.cases(TOK, ["kv"], [3000], [0.5])[0]
    assert alone in cs
    items = {needle.case_item("fact", 4000, d) % len(texts.FACTS) for d in (0.1, 0.3, 0.5, 0.7, 0.9)}
    assert len(items) == len(texts.FACTS)


def test_needle_token_positions_cover_the_span():
    c = texts.needle_case(TOK, "fact", 2000, 0.5, item=0)
    ids, pos = needle.needle_token_positions(TOK, c)
    enc = TOK(c.prompt, return_offsets_mapping=True)
    assert ids == enc.input_ids
    text = "".join(c.prompt[a:b] for a, b in (enc.offset_mapping[p] for p in pos))
    assert text == texts.FACTS[0][0]
    assert pos == list(range(pos[0], pos[-1] + 1))


# ---- rows ----------------------------------------------------------------------------------
def test_rule_and_aggregation_suffixes():
    rows = build_rows(["oracle", "oracle+rule=box2", "corrected@0.9+rule=grid2+agg=max", "oracle+agg=softmax-mean",
                       "corrected@0.9+fp8+rule=box1"], [64, 128])
    assert [r.label for r in rows] == [
        "dense", "oracle/64", "oracle+rule=box2/64", "corrected@0.9+rule=grid2+agg=max/64",
        "oracle+agg=softmax-mean/64", "corrected@0.9+fp8+rule=box1/64", "oracle/128", "oracle+rule=box2/128",
        "corrected@0.9+rule=grid2+agg=max/128", "oracle+agg=softmax-mean/128", "corrected@0.9+fp8+rule=box1/128"]
    by = {r.label: r for r in rows}
    assert by["oracle/64"].scoring == "quest" and by["oracle/64"].settings().scoring == "quest"
    s = by["corrected@0.9+rule=grid2+agg=max/64"].settings()
    assert (s.scoring, s.gqa_aggregation, s.correction_threshold) == ("grid2", "max", 0.9)
    assert by["oracle+agg=softmax-mean/64"].settings().gqa_aggregation == "softmax-mean"
    assert by["corrected@0.9+fp8+rule=box1/64"].kv_fp8
    # the run's rule applies where a row names none
    rows = build_rows(["oracle", "oracle+rule=quest"], [64], scoring="box1")
    assert [r.label for r in rows] == ["dense", "oracle+rule=box1/64", "oracle/64"]


@pytest.mark.parametrize("mode,match", [("oracle+rule=nope", "scoring rule"), ("oracle+agg=median", "aggregation"),
                                        ("oracle+rules=box1", "suffix")])
def test_bad_suffixes_fail(mode, match):
    with pytest.raises(ValueError, match=match):
        build_rows([mode], [64])


def test_rule_labels():
    rows = build_rows(["oracle", "oracle+rule=box1", "corrected@0.9+rule=box1", "oracle+agg=max"], [64],
                      gqa_aggregation="softmax-mean")
    labels = needle.rule_labels(rows, ["keyslse", "box1/max", "box1"])
    assert labels == {"quest/softmax-mean": ("quest", "softmax-mean"), "box1/softmax-mean": ("box1", "softmax-mean"),
                      "quest/max": ("quest", "max"), "keyslse/softmax-mean": ("keyslse", "softmax-mean"),
                      "box1/max": ("box1", "max")}
    with pytest.raises(ValueError):
        needle.rule_labels(rows, ["nope"])
    with pytest.raises(ValueError):
        needle.rule_labels(rows, ["box1/median"])


# ---- diagnostic ----------------------------------------------------------------------------
def test_rank_needle_finds_a_planted_key():
    """One key of page 9 points along the query in the query heads of KV head 1; true mass ranks that page
    first there, and so does the exact-keys rule; pages outside the candidates get no rank."""
    torch.manual_seed(0)
    hkv, g, d, page = 2, 2, 16, 4
    n = 26 * page + 1
    keys = 0.3 * torch.randn(n + 3, hkv, d)
    q = torch.randn(hkv * g, d)
    keys[9 * page + 2, 1] = 8.0 * q[2:4].mean(0)
    rules = {"quest/mean": ("quest", "mean"), "keyslse/mean": ("keyslse", "mean")}
    fitted = {}
    out = needle.rank_needle(q, keys, n, [9 * page + 2], rules, page, n_sink=2, n_window=3, prefill_tokens=n - 1,
                             fitted=fitted)
    assert set(out["rank"]) == {"exact", *rules} and set(fitted) == {"quest", "keyslse"}
    assert out["mass"][1] > 0.5 and out["mass"][0] < 0.2
    assert out["rank"]["exact"][1] == 0 and out["rank"]["keyslse/mean"][1] == 0
    for label in out["rank"]:
        assert all(0 <= r < 27 - 3 - 2 for r in out["rank"][label])
    # a needle in the sink or the window is no candidate: no rank
    for pos in (page * 1, n - 2):
        out = needle.rank_needle(q, keys, n, [pos], rules, page, 2, 3, n - 1, {})
        assert all(r is None for lab in out["rank"] for r in out["rank"][lab])


def _fake_result(names, correct, budgets=("64",), retrieving=3):
    return {"cases": [{"name": nm, "correct": ok, "answers": ["x"] * len(ok), "prompt_tokens": 100, "answer": "1"}
                      for nm, ok in zip(names, correct)],
            "n_new": 8, "threshold": 0.1, "rules": {"quest/mean": ["quest", "mean"]},
            "needle_hits": {lab: {"retrieving": retrieving, "in_top": {b: 1 for b in budgets}}
                            for lab in ("exact", "quest/mean")},
            "rows": needle.row_summary([{"correct": ok} for ok in correct], len(correct[0]))}


def test_row_summary_and_merge():
    a = _fake_result(["a", "b"], [[True, True, False], [False, True, False]])
    assert [r["needle_answered"] for r in a["rows"]] == [1, 2, 0]
    assert [r["needle_of_dense"] for r in a["rows"]] == [1.0, 1.0, 0.0]
    b = _fake_result(["c"], [[True, False, True]], retrieving=5)
    m = needle.merge([a, b])
    assert [c["name"] for c in m["cases"]] == ["a", "b", "c"]
    assert m["needle_hits"]["exact"] == {"retrieving": 8, "in_top": {"64": 2}}
    assert [r["needle_answered"] for r in m["rows"]] == [2, 2, 1]
    assert [r["needle_of_dense"] for r in m["rows"]] == [1.0, 0.5, 0.5]
    assert m["rows"][1]["needle_accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="share a case"):
        needle.merge([a, a])
    with pytest.raises(ValueError, match="budgets"):
        needle.merge([a, _fake_result(["d"], [[True, True, True]], budgets=("128",))])


def test_report_has_needle_columns_and_sections():
    rows = build_rows(["oracle", "oracle+rule=box1"], [64])
    res = _fake_result(["fact@0.5/100#5", "kv@0.5/100#6"], [[True, True, False], [True, False, False]])
    for c in res["cases"]:
        c["answers"] = [" 1", " 1", " 2"]
    summary = report.summarize(rows, {"needle": res})
    assert [s["needle"] for s in summary] == [1.0, 0.5, 0.0]
    assert [s["needle_answered"] for s in summary] == ["2/2", "1/2", "0/2"]
    txt = report.table(summary)
    assert "needle (of dense's)" in txt and "50.00%" in txt
    md = report.markdown_report({"command": "x"}, rows, {"needle": res}, summary)
    assert "## Needle cases" in md and "| fact@0.5/100#5 | 100 | 1 | ' 1' | 1/2 |" in md
    assert "| quest/mean | 3 | 33.3% |" in md
    assert not math.isnan(summary[1]["needle"])
