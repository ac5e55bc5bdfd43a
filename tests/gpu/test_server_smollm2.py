"""The real SmolLM2-135M-Instruct served by stock SGLang, FreeKV against dense, near the model's 8K context.

The FreeKV server is started exactly as the README's quick start does (``python -m freekv_sglang.serve``:
the default model and its 8K settings, sink 128 + selected 1024 + window 256 tokens), the dense server
with ``python -m sglang.launch_server --attention-backend flashinfer``; both run at once on one GPU.

The model folder: ``FREEKV_SMOLLM2`` (an HF folder of the model), else the default model's cache
(``FREEKV_MODEL_CACHE``, written by ``python -m freekv_sglang.default_model``). Without either the
module is skipped; ``launch/gpu_check.sh`` runs it when the folder is present.

Every comparison is printed (``-s``) and written to ``$OUT/smollm2_checks.json`` for docs/FIDELITY.md.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from freekv_sglang import default_model, serve
from freekv_sglang.serving import Server, common_prefix, output_ids
from freekv_sglang.testing import teacher_forcing as tf
from freekv_sglang.testing.greedy_compare import GreedyTrace, compare_runs


def _model_folder() -> str:
    env = os.environ.get("FREEKV_SMOLLM2", "")
    if env:
        return env
    cache = default_model.default_cache_dir()
    return str(cache) if default_model.is_converted(cache) else ""


SMOL = _model_folder()
LOGDIR = os.environ.get("OUT") or tempfile.mkdtemp(prefix="freekv-smollm2-")
PORT = int(os.environ.get("FREEKV_TEST_PORT", "30011"))
RESULTS = Path(LOGDIR) / "smollm2_checks.json"

pytestmark = pytest.mark.skipif(not os.path.isdir(SMOL), reason="no SmolLM2 folder: set FREEKV_SMOLLM2 or convert "
                                                                "the default model (python -m freekv_sglang.default_model)")

# both servers share the GPU; small CUDA-graph batches keep start-up short
SHARED = ["--mem-fraction-static", "0.3", "--cuda-graph-max-bs", "16", "--enable-custom-logit-processor",
          "--disable-overlap-schedule"]
N_CTX = 7600  # prompt tokens for the near-8K cases


def _record(key: str, value) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[key] = value
    RESULTS.write_text(json.dumps(data, indent=1))
    print(f"\n[{key}] {json.dumps(value)[:2000]}")


@pytest.fixture(scope="module")
def servers():
    """``{"dense": Server, "freekv": Server}``, started together."""
    freekv_args = [*SHARED, "--enable-metrics", "--freekv-host-memory-gb", "8"]
    env = {}
    if default_model.is_converted(Path(SMOL)):
        env[default_model.CACHE_ENV] = SMOL  # the quick start's command: no --model-path at all
    else:
        freekv_args = ["--model-path", SMOL, *(x for kv in serve.DEFAULT_MODEL_FLAGS for x in kv), *freekv_args]
    srv = {
        "dense": Server(["--model-path", SMOL, "--context-length", "8192", "--attention-backend", "flashinfer",
                         *SHARED], port=PORT, log_path=os.path.join(LOGDIR, "server-smollm2-dense.log"),
                        start_timeout=600),
        "freekv": Server(freekv_args, port=PORT + 1, log_path=os.path.join(LOGDIR, "server-smollm2-freekv.log"),
                         start_timeout=600, module="freekv_sglang.serve", env=env),
    }
    try:
        for s in srv.values():
            s.launch()
        for s in srv.values():
            s.wait_healthy()
        yield srv
    finally:
        for s in srv.values():
            s.stop()


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOL)


def _both(servers, fn):
    """``fn(server)`` on both servers at once; ``{"dense": ..., "freekv": ...}``."""
    with ThreadPoolExecutor(2) as ex:
        futs = {name: ex.submit(fn, s) for name, s in servers.items()}
        return {name: f.result() for name, f in futs.items()}


def _chat_ids(tok, document: str, question: str) -> list[int]:
    msgs = [{"role": "user", "content": f"{document}\n\nQuestion: {question}"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


def _story(tok, n_tokens: int) -> str:
    """The harness's 5.4K-token story, after the start of the ``code`` text (unrelated Python source) that
    brings the whole to about ``n_tokens`` tokens: a question about the story then needs its early pages."""
    from freekv_sglang.fidelity.texts import code, prose

    story = prose().text
    pad = n_tokens - len(tok(story).input_ids)
    if pad <= 0:
        return tok.decode(tok(story).input_ids[:n_tokens])
    return tok.decode(tok(code().text).input_ids[:pad]) + "\n\n" + story


# ----------------------------------------------------------------------------------------- the checks
def test_the_freekv_server_is_the_quick_start(servers):
    info = servers["freekv"].server_info()
    fk = info["internal_states"][0]["freekv"]
    assert fk["settings"]["enabled"] and fk["settings"]["select_tokens"] == 1024
    assert (fk["settings"]["sink_tokens"], fk["settings"]["window_tokens"]) == (128, 256)
    assert info.get("context_length") == 8192
    _record("freekv_settings", fk["settings"] | {"decode_attention": fk["decode_attention"]})


def test_passkeys_found_wherever_dense_finds_them(servers, tok):
    from freekv_sglang.fidelity.texts import fillers_for_tokens, passkey_key, passkey_prompt

    n = fillers_for_tokens(tok, N_CTX)
    cases = [(passkey_key(1000 + i), d) for i, d in enumerate((0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95))]
    prompts = [passkey_prompt(tok, key, depth, n)[0] for key, depth in cases]
    runs = _both(servers, lambda s: [output_ids(r) for r in s.generate_many(prompts, 12)])
    found = {name: [re.search(r"\d{5}", tok.decode(ids)) is not None and key in tok.decode(ids)
                    for (key, _), ids in zip(cases, out)] for name, out in runs.items()}
    _record("passkeys", {"prompt_tokens": [len(p) for p in prompts], "depths": [d for _, d in cases],
                         "dense": found["dense"], "freekv": found["freekv"]})
    assert sum(found["dense"]) >= len(cases) // 2, "dense itself fails most passkeys: the check measures nothing"
    missed = [d for (_, d), f, dn in zip(cases, found["freekv"], found["dense"]) if dn and not f]
    assert not missed, f"FreeKV missed passkeys dense found at depths {missed}"


def test_greedy_continuations_as_long_as_dense(servers, tok):
    """Chat answers over the story near 8K, greedy with EOS: FreeKV stops where dense stops (the same
    finish reason and the same number of tokens), and how long the two agree token by token."""
    story = _story(tok, 7000)
    questions = ["Who took the post at the lighthouse?", "How often does the light turn?",
                 "Summarize the story in two sentences.", "What did Maren find in the cupboard under the stairs?"]
    prompts = [_chat_ids(tok, story, q) for q in questions]

    def run(s):
        with ThreadPoolExecutor(len(prompts)) as ex:
            return list(ex.map(lambda p: s.generate(p, 96, ignore_eos=False), prompts))

    out = _both(servers, run)
    rows = []
    for i, q in enumerate(questions):
        d, f = out["dense"][i], out["freekv"][i]
        di, fi = output_ids(d), output_ids(f)
        rows.append({"question": q, "prompt_tokens": len(prompts[i]), "dense_tokens": len(di),
                     "freekv_tokens": len(fi), "equal_prefix": common_prefix(di, fi),
                     "dense_finish": d["meta_info"]["finish_reason"]["type"],
                     "freekv_finish": f["meta_info"]["finish_reason"]["type"],
                     "dense": tok.decode(di), "freekv": tok.decode(fi)})
    _record("greedy_chat", rows)
    for r in rows:
        assert r["freekv_finish"] == r["dense_finish"], r
    assert sum(r["freekv_tokens"] for r in rows) == pytest.approx(sum(r["dense_tokens"] for r in rows), rel=0.25)


def test_mixed_batch_of_short_and_long_requests(servers, tok):
    """Short requests (context within the working set) are exact in FreeKV: equal to dense up to rounding
    ties; long ones are served in the same batch and their first token (from the dense prefill) is dense's."""
    from freekv_sglang.fidelity.texts import prose

    text = tok(prose().text).input_ids * 2
    lens = [40, 300, 700, 1200, 2500, 4000, 6000, 7600]
    prompts = [text[i * 97: i * 97 + n] for i, n in enumerate(lens)]
    short = [i for i, n in enumerate(lens) if n + 48 <= 1408]
    out = _both(servers, lambda s: s.generate_many(prompts, 48, top_logprobs=2))
    traces = {name: [GreedyTrace.from_response(r) for r in rs] for name, rs in out.items()}
    cmp = compare_runs([traces["freekv"][i] for i in short], [traces["dense"][i] for i in short])
    _record("mixed_batch", {"prompt_tokens": lens, "short": short,
                            "equal_prefix": [common_prefix(a.tokens, b.tokens)
                                             for a, b in zip(traces["freekv"], traces["dense"])],
                            "short_vs_dense": str(cmp)})
    assert all(len(t.tokens) == 48 for t in traces["freekv"])
    assert cmp.ok, str(cmp)
    assert [t.tokens[0] for t in traces["freekv"]] == [t.tokens[0] for t in traces["dense"]]


def test_openai_chat_long_context_question(servers, tok):
    story = _story(tok, 7000)
    msgs = [{"role": "user", "content": f"{story}\n\nQuestion: What is the name of the lighthouse keeper? "
                                        "Answer with her name."}]
    out = _both(servers, lambda s: s.chat(msgs, 32))
    answers = {name: r["choices"][0]["message"]["content"] for name, r in out.items()}
    usage = out["freekv"]["usage"]
    _record("openai_chat", {"prompt_tokens": usage["prompt_tokens"], **answers})
    assert usage["prompt_tokens"] > 6000
    for name, r in out.items():
        assert r["object"] == "chat.completion" and r["choices"][0]["finish_reason"] in ("stop", "length")
    if "Maren" in answers["dense"]:
        assert "Maren" in answers["freekv"], answers


def test_sglang_frontend_program_with_fork(servers, tok):
    import sglang as sgl

    story = _story(tok, 7000)

    @sgl.function
    def two_questions(s, document):
        s += sgl.user(document + "\n\nAnswer the question about the story above.")
        forks = s.fork(2)
        for f, q in zip(forks, ("Who is the keeper of the light?", "Who is the inspector from the harbour board?")):
            f += sgl.user(q)
            f += sgl.assistant(sgl.gen("answer", max_tokens=24, temperature=0))
        s["answers"] = [f["answer"] for f in forks]

    def run(server):
        backend = sgl.RuntimeEndpoint(server.base)
        state = two_questions.run(document=story, backend=backend)
        return state["answers"]

    answers = _both(servers, run)
    _record("frontend_fork", answers)
    assert all(isinstance(a, str) and a.strip() for a in answers["freekv"])
    for d, f, name in zip(answers["dense"], answers["freekv"], ("Maren", "Reyes")):
        if name in d:
            assert name in f, answers


#: standard errors of the paired per-step difference within which two agreement rates are equal (about 1%
#: of equal pairs fall outside 2.6 SE)
NOISE_SE = 2.6


def test_teacher_forced_top1_matches_the_cpu_reference(servers, tok):
    """The GPU decode path against the plain-torch reference on the same model: teacher-forced along the
    story, the server's per-step top-1 (FreeKV and dense) against the fidelity harness's rows
    (corrected@0.9 and dense, same sink / window / budget; float32, its plain-torch code run on the GPU),
    on the same prefix and steps."""
    import torch

    from freekv_sglang.fidelity import model as fmodel
    from freekv_sglang.fidelity import rows as frows
    from freekv_sglang.fidelity.tasks import teacher_forced_top1
    from freekv_sglang.fidelity.texts import prose

    ids = tok(prose().text).input_ids
    n_prefill, steps = 2048, 1500  # one step is 0.07 point: enough steps that bf16-vs-float32 flips average out
    forced = ids[n_prefill:n_prefill + steps + 1]
    t0 = time.time()
    resp = _both(servers, lambda s: s.post("/generate", tf.request_body(ids[:n_prefill], forced), 600))
    server_top1 = {name: tf.model_top1(r, forced)[1:] for name, r in resp.items()}  # step 0 is the prefill's
    t_server = time.time() - t0
    t0 = time.time()
    # the fidelity harness's plain-torch code, in float32, run on the GPU to finish in seconds
    lm = fmodel.load(SMOL, threads=min(16, os.cpu_count() or 1), device="cuda")
    spec = frows.build_rows(["corrected@0.9"], [1024], sink_tokens=128, window_tokens=256)
    with torch.inference_mode():
        cpu = teacher_forced_top1(lm, spec, ids, n_prefill, steps)
    t_cpu = time.time() - t0
    cpu_top1 = {"dense": cpu[0].tolist(), "freekv": cpu[1].tolist()}
    sf, sd, cf, cd = server_top1["freekv"], server_top1["dense"], cpu_top1["freekv"], cpu_top1["dense"]
    # FreeKV's agreement with dense, served vs reference; and how far each served path strays from its reference
    d_agree, se_agree = tf.agreement_difference(sf, sd, cf, cd)
    d_stray, se_stray = tf.agreement_difference(sf, cf, sd, cd)
    res = {
        "steps": steps, "contexts": [n_prefill + 1, n_prefill + steps],
        "server_freekv_vs_server_dense": tf.agreement(sf, sd),
        "cpu_freekv_vs_cpu_dense": tf.agreement(cf, cd),
        "server_dense_vs_cpu_dense": tf.agreement(sd, cd),
        "server_freekv_vs_cpu_freekv": tf.agreement(sf, cf),
        "agreement_difference": round(d_agree, 5), "agreement_difference_se": round(se_agree, 5),
        "stray_difference": round(d_stray, 5), "stray_difference_se": round(se_stray, 5),
        "server_s": round(t_server, 1), "cpu_s": round(t_cpu, 1),
    }
    _record("teacher_forced", res)
    # "Within noise": the served paths are bf16 and the reference float32, so a few % of steps flip their
    # top-1 on either side; each flip moves an agreement rate by 1/steps with either sign. A difference is
    # noise while it stays within NOISE_SE standard errors of the per-step paired difference (or 0.5 point).
    # The GPU FreeKV path strays from its reference no more than the GPU dense path strays from dense ...
    assert d_stray >= -max(0.005, NOISE_SE * se_stray), res
    # ... and FreeKV's agreement with dense served equals the reference's
    assert abs(d_agree) <= max(0.005, NOISE_SE * se_agree), res


# ----------------------------------------------------------------------------------------- metrics
def _scrape(text: str) -> dict[str, float]:
    """``name{labels}`` -> value of the FreeKV samples in a Prometheus text page (labels kept verbatim)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("sglang:freekv_"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _sum(samples: dict[str, float], name: str, label: str = "") -> float:
    return sum(v for k, v in samples.items() if k.split("{")[0] == name and label in k)


def test_metrics_move_as_requests_run(servers, tok):
    s = servers["freekv"]
    before = _scrape(s.metrics())
    text = tok(_story(tok, 7000)).input_ids
    s.generate_many([text[:7000], text[:500]], 200)
    time.sleep(1.0)
    after = _scrape(s.metrics())
    info = s.server_info()["internal_states"][0]["freekv"]
    _record("metrics", {"after": after, "server_info_totals": info["totals"]})
    assert _sum(after, "sglang:freekv_host_tier_pages_total") > 0
    assert _sum(after, "sglang:freekv_working_set_rows_total") > 0
    for name, label in (("sglang:freekv_decode_steps_total", ""),
                        ("sglang:freekv_decode_request_steps_total", 'mode="sparse"'),
                        ("sglang:freekv_decode_request_steps_total", 'mode="dense"'),
                        ("sglang:freekv_correction_checks_total", ""),
                        ("sglang:freekv_recalled_pieces_total", 'path="speculative"'),
                        ("sglang:freekv_recalled_bytes_total", "")):
        assert _sum(after, name, label) > _sum(before, name, label), (name, label)
    assert 0 <= _sum(after, "sglang:freekv_corrected_head_ratio") <= 1
    assert info["totals"]["decode_steps"] >= _sum(after, "sglang:freekv_decode_steps_total") > 0
