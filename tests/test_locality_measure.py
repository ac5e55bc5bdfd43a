"""The real-locality measurement (freekv_sglang.fidelity.locality): its replay against the reference
algorithm, its capture against transformers' own KV cache, its summaries and files, on the CPU."""

import json
import math

import pytest
import torch

from freekv_sglang.algorithm import LayerState, RetrievalSettings, WorkingSetLayout
from freekv_sglang.algorithm.correction import query_similarity
from freekv_sglang.fidelity import locality as L

PAGE, SINK, WINDOW = 8, 16, 32


def _qk(n=420, hq=6, hkv=2, d=16, seed=0, drift=0.9):
    """Queries that drift slowly (as a trained model's do) and random keys."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(hq, d, generator=g) * 2
    q = base + drift * torch.randn(n, hq, d, generator=g)
    k = torch.randn(n, hkv, d, generator=g)
    return q, k


@pytest.mark.parametrize("budget", [16, 48])
def test_replay_matches_the_reference_layer_state(budget):
    """Oracle recalls per step equal the replay's page changes; the corrected mode's flags equal similarity < tau."""
    q, k = _qk()
    start, hkv = 300, 2
    v = torch.randn_like(k)
    tr = L.replay_layer(q, k, start, hkv, budgets=(budget,), page_size=PAGE, sink=SINK, window=WINDOW)
    lay = WorkingSetLayout.from_tokens(PAGE, SINK, budget, WINDOW)
    oracle = LayerState(RetrievalSettings.for_mode("oracle", lay), hkv)
    corrected = LayerState(RetrievalSettings.for_mode("corrected", lay, tau=0.9), hkv)
    for st in (oracle, corrected):
        st.prefill(k[:start], q[start - 1])
    for i in range(start, q.shape[0]):
        for st in (oracle, corrected):
            st.decode(q[i], k[: i + 1], v[: i + 1], 0.25)
    want_changed = torch.tensor([s.recalled_pages for s in oracle.stats[1:]])
    assert torch.equal(tr.changed[budget][1:].sum(1), want_changed)
    assert (tr.changed[budget][0] == -1).all() and torch.isnan(tr.sim[0]).all()
    want_flags = torch.tensor([s.corrected_heads for s in corrected.stats[1:]])
    assert torch.equal((tr.sim[1:] < 0.9).sum(1), want_flags)
    assert 0 < int(want_flags.sum()) < want_flags.numel() * hkv  # the check is neither always nor never true here
    assert (tr.selected[budget] == lay.n_select).all()  # the contexts have more candidates than the budget


def test_replay_with_another_scoring_rule_matches_the_reference():
    """``rule="grid2sink16"``: page changes equal the reference's oracle recalls with that rule, fitted on the
    prefill's sink as the reference fits it; and they differ from Quest's (the rule is used)."""
    q, k = _qk(n=360, d=64)
    start, hkv, budget = 300, 2, 16
    v = torch.randn_like(k)
    tr = L.replay_layer(q, k, start, hkv, budgets=(budget,), page_size=PAGE, sink=SINK, window=WINDOW,
                        rule="grid2sink16")
    quest = L.replay_layer(q, k, start, hkv, budgets=(budget,), page_size=PAGE, sink=SINK, window=WINDOW)
    lay = WorkingSetLayout.from_tokens(PAGE, SINK, budget, WINDOW)
    oracle = LayerState(RetrievalSettings.for_mode("oracle", lay, scoring="grid2sink16"), hkv)
    oracle.prefill(k[:start], q[start - 1])
    for i in range(start, q.shape[0]):
        oracle.decode(q[i], k[: i + 1], v[: i + 1], 0.125)
    want = torch.tensor([s.recalled_pages for s in oracle.stats[1:]])
    assert torch.equal(tr.changed[budget][1:].sum(1), want)
    assert not torch.equal(tr.changed[budget], quest.changed[budget])


@pytest.mark.parametrize("rule", ["quest", "grid2sink16"])
def test_replay_with_a_keep_margin_matches_the_reference_recalls(rule):
    """``keep_margin=2``: page changes equal the reference's oracle recalls with the same keep margin (the
    sticky selection), and there are fewer of them than without the margin."""
    q, k = _qk(n=380, d=64, drift=1.5)
    start, hkv, budget = 300, 2, 16
    v = torch.randn_like(k)
    tr = L.replay_layer(q, k, start, hkv, budgets=(budget,), page_size=PAGE, sink=SINK, window=WINDOW,
                        rule=rule, keep_margin=2, chunk=32)
    plain = L.replay_layer(q, k, start, hkv, budgets=(budget,), page_size=PAGE, sink=SINK, window=WINDOW, rule=rule)
    lay = WorkingSetLayout.from_tokens(PAGE, SINK, budget, WINDOW)
    oracle = LayerState(RetrievalSettings.for_mode("oracle", lay, keep_margin=2, scoring=rule), hkv)
    oracle.prefill(k[:start], q[start - 1])
    for i in range(start, q.shape[0]):
        oracle.decode(q[i], k[: i + 1], v[: i + 1], 0.125)
    want = torch.tensor([s.recalled_pages for s in oracle.stats[1:]])
    assert torch.equal(tr.changed[budget][1:].sum(1), want)
    assert int(tr.changed[budget][1:].sum()) < int(plain.changed[budget][1:].sum())


def test_replay_similarity_is_the_runtime_check():
    q, k = _qk(n=200)
    tr = L.replay_layer(q, k, 100, 2, budgets=(16,), page_size=PAGE, sink=SINK, window=WINDOW)
    want = query_similarity(q[101:200], q[100:199], 2)
    torch.testing.assert_close(tr.sim[1:], want)


def test_replay_several_budgets_in_one_pass_equal_separate_passes():
    q, k = _qk(n=360, seed=3)
    both = L.replay_layer(q, k, 250, 2, budgets=(16, 32), page_size=PAGE, sink=SINK, window=WINDOW, chunk=7)
    one = L.replay_layer(q, k, 250, 2, budgets=(32,), page_size=PAGE, sink=SINK, window=WINDOW)
    assert torch.equal(both.changed[32], one.changed[32])
    assert (both.changed[16][1:] >= 0).all()


def test_replay_refuses_a_start_outside_the_positions():
    q, k = _qk(n=50)
    with pytest.raises(ValueError, match="start"):
        L.replay_layer(q, k, 50, 2)


def _traces(n_layers=3, seed=0):
    out = []
    for l in range(n_layers):
        q, k = _qk(n=380, seed=seed + l, drift=0.6 + 0.3 * l)
        out.append(L.replay_layer(q, k, 280, 2, budgets=(16, 32), page_size=PAGE, sink=SINK, window=WINDOW))
    return out


def test_head_summary_numbers():
    tr = _traces(1)[0]
    s = L.head_summary(tr.sim[:, 0], {b: c[:, 0] for b, c in tr.changed.items()},
                       {b: c[:, 0] for b, c in tr.selected.items()}, thresholds=(0.5, 0.9), tau=0.9, budget=32)
    sim = tr.sim[1:, 0]
    assert s["steps"] == len(sim)
    assert s["correction_rate"]["0.9"] == pytest.approx(float((sim < 0.9).float().mean()), abs=1e-4)
    pct = s["similarity"]["percentiles"]
    assert len(pct) == 101 and pct == sorted(pct)
    assert pct[0] == pytest.approx(float(sim.min()), abs=1e-4) and pct[100] == pytest.approx(float(sim.max()), abs=1e-4)
    assert sum(s["similarity"]["histogram"]) == len(sim)
    share = (tr.changed[32][1:, 0].float() / tr.selected[32][1:, 0].float()).mean()
    assert s["page_change"]["32"] == pytest.approx(float(share), abs=1e-4)
    fired = sim < 0.9
    if fired.any() and (~fired).any():
        ch = tr.changed[32][1:, 0].float() / 4
        assert s["page_change_corrected"] == pytest.approx(float(ch[fired].mean()), abs=1e-4)
        assert s["page_change_kept"] == pytest.approx(float(ch[~fired].mean()), abs=1e-4)


def test_summarize_table_and_json_round_trip(tmp_path):
    per_text = {"prose": _traces(3), "code": _traces(3, seed=10)}
    s = L.summarize(per_text, 280, thresholds=(0.5, 0.9), tau=0.9, budget=32)
    assert len(s["heads"]) == 3 and len(s["heads"][0]) == 2 and len(s["per_layer"]) == 3
    # pooled = every (layer, head, step) of both texts
    sims = torch.cat([t.sim[1:].flatten() for ts in per_text.values() for t in ts])
    assert s["pooled"]["steps"] == len(sims)
    assert s["pooled"]["correction_rate"]["0.9"] == pytest.approx(float((sims < 0.9).float().mean()), abs=1e-4)
    assert sum(b["share_of_steps"] for b in s["by_similarity"]) == pytest.approx(1.0, abs=1e-3)
    assert [b["context"][0] for b in s["by_context"]["prose"]] == [281]
    md = L.table(s, thresholds=(0.5, 0.9), budget=32)
    assert md.count("\n") == 2 + 3 + 2 + 1 - 1 and "corr@0.9" in md and "**all**" in md
    text = L.dumps({"meta": {"x": 1}, **s})
    path = tmp_path / "loc.json"
    path.write_text(text)
    back = L.load(str(path))
    assert back["heads"][2][1]["similarity"]["percentiles"] == s["heads"][2][1]["similarity"]["percentiles"]
    assert back["pooled"] == json.loads(json.dumps(s["pooled"]))
    with pytest.raises(ValueError, match="not a locality measurement"):
        (tmp_path / "other.json").write_text("{}")
        L.load(str(tmp_path / "other.json"))


# -- capture and the command line on a tiny random Llama -----------------------------------------------
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from freekv_sglang.testing.random_llama import RandomLlamaSpec, write_random_llama
    from freekv_sglang.testing.shape_models import write_tokenizer

    folder = tmp_path_factory.mktemp("tiny_llama")
    spec = RandomLlamaSpec(hidden=64, layers=2, q_heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=512,
                           max_positions=2048)
    write_random_llama(folder, spec)
    write_tokenizer(folder, vocab=512)
    return str(folder)


def test_capture_gives_the_post_rope_queries_and_the_cached_keys(tiny_model):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = list(range(5, 105))
    qs, ks = L.capture_qk(m, ids)
    assert m.config._attn_implementation == "sdpa"  # restored
    assert len(qs) == 2 and qs[0].shape == (100, 4, 16) and ks[0].shape == (100, 2, 16)
    with torch.no_grad():
        out = m(input_ids=torch.tensor([ids]), use_cache=True)
    for layer in range(2):
        cached = out.past_key_values.layers[layer].keys[0].transpose(0, 1)  # [n, Hkv, D], post-RoPE
        torch.testing.assert_close(ks[layer], cached.float())
    # post-RoPE: the query of a repeated token differs between positions, its norm does not
    ids2 = [7] * 20
    q2, _ = L.capture_qk(m, ids2)
    assert not torch.allclose(q2[0][3], q2[0][12])
    torch.testing.assert_close(q2[0][3].norm(dim=-1), q2[0][12].norm(dim=-1), rtol=1e-4, atol=1e-4)


def test_command_line_writes_the_json_and_the_table(tiny_model, tmp_path):
    js, md = tmp_path / "loc.json", tmp_path / "loc.md"
    out = L.main(["--model", tiny_model, "--texts", "prose", "--max-tokens", "400", "--prefill", "300",
                  "--budgets", "32,64", "--default-budget", "64", "--page-size", "8", "--sink", "16", "--window", "32",
                  "--threads", "1", "--json", str(js), "--markdown", str(md)], log=lambda *a: None)
    data = L.load(str(js))
    assert data["meta"]["working set"]["default_budget"] == 64
    assert data["meta"]["texts"]["prose"]["decode_steps"] == 100
    assert len(data["heads"]) == 2 and len(data["heads"][0]) == 2
    h = data["heads"][1][0]
    assert h["steps"] == 99 and set(h["page_change"]) == {"32", "64"}
    assert set(h["correction_rate"]) == {f"{t:g}" for t in L.THRESHOLDS}
    assert "| **all** |" in md.read_text()
    assert not math.isnan(out["pooled"]["correction_rate"]["0.9"])
