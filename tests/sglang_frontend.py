"""SGLang 0.5.17's HTTP front end on the CPU, with a stand-in for the scheduler: what each bad input gets.

Builds SGLang's own FastAPI app, a real ``TokenizerManager`` (byte-level tokenizer of
:mod:`freekv_sglang.testing.shape_models`, vocabulary 49152, a 4096-token context) and the OpenAI serving
handlers, and replaces only the hand-off to the scheduler: a request that reaches it is recorded and answered
with one token, or, in mode ``scheduler``, first passed as a real ``Req`` through FreeKV's scheduler check
(:func:`freekv_sglang.request_checks.before_add_request_to_queue`) and answered with the abort it sets.

Modes: ``stock`` (SGLang alone), ``freekv`` (the plugin's tokenizer-side check, as ``plugin.register`` installs
it on a FreeKV server), ``scheduler`` (only the scheduler-side check). Run as a script in its own process (the
tokenizer manager sets process-wide SGLang state): ``python tests/sglang_frontend.py MODE... < cases.json``
prints ``FRONTEND-RESULTS {mode: [...]}``: per case ``[path, body (a JSON value, or a str: raw bytes as
latin-1), content type]``, ``{"status", "text", "reached" (the scheduler), "ids" (what it got)}``.
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
from pathlib import Path

VOCAB = 49152
CONTEXT = 4096


def build(mode: str, folder: Path):
    from freekv_sglang.testing.shape_models import write_shape_model

    write_shape_model(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["max_position_embeddings"] = CONTEXT
    cfg.pop("rope_scaling", None)
    (folder / "config.json").write_text(json.dumps(cfg))

    import freekv_sglang
    from freekv_sglang import request_checks

    sa = freekv_sglang.make_server_args(model_path=str(folder), device="cpu", kv_retrieval="freekv",
                                        freekv_host_memory_gb=1, load_format="dummy")
    from sglang.srt.entrypoints import http_server as hs
    from sglang.srt.entrypoints.openai.serving_completions import OpenAIServingCompletion
    from sglang.srt.managers import schedule_batch
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.managers.tokenizer_manager import TokenizerManager
    from sglang.srt.parser.template_manager import TemplateManager
    from sglang.srt.server_args import PortArgs

    tm = TokenizerManager(sa, PortArgs.init_new(sa))
    tm.max_req_input_len = CONTEXT - 1
    if mode == "freekv":  # what the plugin's AROUND hook does, on this instance only
        tm._validate_one_request = functools.partial(request_checks.around_validate_one_request,
                                                     TokenizerManager._validate_one_request, tm)
    tmpl = TemplateManager()
    tmpl.initialize_templates(tokenizer_manager=tm, model_path=sa.model_path, chat_template=None,
                              completion_template=None)
    hs.set_global_state(hs._GlobalState(tokenizer_manager=tm, template_manager=tmpl, scheduler_info={}))
    hs.app.state.openai_serving_completion = OpenAIServingCompletion(tm, tmpl)
    hs.app.state.openai_serving_chat = tm.serving_chat_class(tm, tmpl)
    # Req.set_finish_with_abort logs on TP rank 0 only; there is no TP group here
    schedule_batch.get_parallel = lambda: type("P", (), {"tp_rank": 0})()
    scheduler = type("S", (), {"model_config": tm.model_config})()
    reached = []

    def dispatch(obj):
        if not hasattr(obj, "input_ids"):  # a batch of tokenized requests, or an AbortReq
            for sub in getattr(obj, "batch", None) or ():
                dispatch(sub)
            return
        reached.append(list(obj.input_ids))
        finish = {"type": "length", "length": 1}
        out_ids, text = [300], " t1"
        if mode == "scheduler":
            req = Req(obj.rid, obj.input_text, obj.input_ids, obj.sampling_params, vocab_size=VOCAB)
            request_checks.before_add_request_to_queue(scheduler, req)
            if req.to_finish is not None:
                finish, out_ids, text = req.to_finish.to_json(), [], ""
        state = tm.rid_to_state[obj.rid]
        state.out_list.append({"text": text, "output_ids": out_ids, "meta_info": {
            "id": obj.rid, "finish_reason": finish, "prompt_tokens": len(obj.input_ids),
            "completion_tokens": len(out_ids), "cached_tokens": 0, "weight_version": "default"}})
        state.finished = True
        state.event.set()

    tm._dispatch_to_scheduler = dispatch
    return hs.app, reached


def main(modes: list[str]) -> None:
    from fastapi.testclient import TestClient

    cases = json.load(sys.stdin)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            app, reached = build(mode, Path(tmp) / mode)
            client = TestClient(app, raise_server_exceptions=False)
            out = results[mode] = []
            for path, body, ctype in cases:
                n0 = len(reached)
                data = body.encode("latin-1") if isinstance(body, str) else json.dumps(body).encode()
                r = client.post(path, content=data, headers={"content-type": ctype})
                out.append({"status": r.status_code, "text": r.text, "reached": len(reached) > n0,
                            "ids": reached[-1][:8] if len(reached) > n0 else None})
    print("FRONTEND-RESULTS " + json.dumps(results))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1:])
