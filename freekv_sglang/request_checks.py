"""Bad requests a FreeKV server refuses with a message, where SGLang 0.5.17 lets them through (issue 28).

SGLang answers most malformed requests with a 400 and a message on its own (docs/RELIABILITY.md, "Bad input",
has the whole table). Two kinds get past it:

* **Token ids outside the vocabulary** (``input_ids`` or an OpenAI ``prompt`` of ids): nothing compares them with
  the vocabulary (``TokenizerManager._validate_input_ids_in_vocab`` exists but has no caller), and with one GPU
  the embedding gathers the row as given (its bounds check runs only with ``SGLANG_ENABLE_ASYNC_ASSERT``): a
  device-side assert in the scheduler, which takes the whole server down, dense or FreeKV alike.
* **Sampling parameters of the wrong type** on ``/generate`` (``"max_new_tokens": "many"``, ``"temperature":
  "hot"``, a misspelt key): SGLang's own checks add or compare them and raise a ``TypeError``, which its
  ``/generate`` handler does not catch: a 500 without a message (the OpenAI endpoints type-check their bodies).

Two hooks refuse them, only on servers started with ``--kv-retrieval freekv``:

* :func:`around_validate_one_request`, AROUND ``TokenizerManager._validate_one_request`` (the HTTP server's
  process; registered by :func:`freekv_sglang.plugin.register`, which runs there before arguments are parsed, so
  it checks per request whether the server runs FreeKV): raises ``ValueError``, which SGLang answers with a 400
  and the message before the request is queued (``/generate`` streams get SGLang's error event);
* :func:`before_add_request_to_queue`, BEFORE ``Scheduler._add_request_to_queue`` (scheduler processes, with the
  runtime hooks): the ids again, for front ends that do not load plugins (SGLang's multi-tokenizer workers, its
  gRPC and Rust servers). It ends the request as SGLang ends a prompt longer than the context there
  (``Req.set_finish_with_abort``: status 400 and the message, after a one-token prefill), and the server stays up.

Standard library only: the HTTP server's process imports this module.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from freekv_sglang import compat

#: ``SamplingParams`` fields that SGLang 0.5.17 adds to or compares with numbers before checking their type
#: (``TokenizerManager._validate_one_request``, ``SamplingParams.__post_init__`` and ``verify``). ``n`` is not
#: here: a non-number fails in ``GenerateReqInput.normalize_batch_and_arguments``, before any hook can see it.
NUMERIC_SAMPLING_PARAMS = ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p",
                           "frequency_penalty", "presence_penalty", "repetition_penalty")


def out_of_vocab(ids: Optional[Sequence[int]], vocab_size: Optional[int]) -> Optional[str]:
    """Why ``ids`` cannot be embedded by a model of ``vocab_size`` tokens, or ``None`` when every id lies in
    ``[0, vocab_size)``. One pass of ``min``/``max`` over the ids when they are all valid."""
    if ids is None or not vocab_size or len(ids) == 0:
        return None
    if min(ids) >= 0 and max(ids) < vocab_size:
        return None
    bad = [(i, t) for i, t in enumerate(ids) if not 0 <= t < vocab_size]
    i, t = bad[0]
    more = f" ({len(bad)} of the {len(ids)} ids are)" if len(bad) > 1 else ""
    return (f"input_ids[{i}] = {t} is outside the model's vocabulary [0, {vocab_size}){more}; "
            "token ids must be below vocab_size")


def sampling_params_problem(params: Any, known: Optional[Sequence[str]] = None) -> Optional[str]:
    """Why SGLang would fail on ``params`` (a request's ``sampling_params`` dict) with a ``TypeError`` rather than
    a message, or ``None``: a numeric field that is not a number, or (with ``known``, the field names of SGLang's
    sampling-parameter class) a key it does not take. Values SGLang checks itself (ranges, ``None``) pass."""
    if not isinstance(params, dict):
        return None  # SGLang's request model types the container itself
    for key in NUMERIC_SAMPLING_PARAMS:
        value = params.get(key)
        if value is not None and not isinstance(value, (int, float)):
            return f"sampling_params.{key} must be a number, got {value!r}"
    if known is not None:
        fields = set(known)
        unknown = sorted(str(k) for k in params if k not in fields)
        if unknown:
            return f"unknown sampling parameter{'s' if len(unknown) > 1 else ''}: {', '.join(map(repr, unknown))}"
    return None


def freekv_requested(server_args: Any) -> bool:
    """Whether this server runs FreeKV: the config the plugin attaches to the ServerArgs (or exports for the
    scheduler processes)."""
    cfg = getattr(server_args, compat.SERVER_ARGS_ATTR, None)
    if cfg is None:
        from freekv_sglang.config import FreeKVConfig, FreeKVConfigError

        try:
            cfg = FreeKVConfig.from_env()
        except FreeKVConfigError:
            return False
    return cfg is not None and cfg.enabled


def _sampling_fields(cls: Any) -> Optional[tuple]:
    """The keyword arguments SGLang's sampling-parameter class takes (a msgspec Struct's fields), if it says."""
    fields = getattr(cls, "__struct_fields__", None)
    return tuple(fields) if fields else None


def check_request(obj: Any, input_ids: Optional[Sequence[int]], vocab_size: Optional[int],
                  sampling_cls: Any = None) -> Optional[str]:
    """Why a tokenized request (``obj``: SGLang's ``GenerateReqInput`` or ``EmbeddingReqInput`` of one prompt,
    ``input_ids`` its ids) must be refused, or ``None``. Multimodal requests are left to SGLang: their ids carry
    placeholder tokens its processors choose."""
    contains_mm = getattr(obj, "contains_mm_input", None)
    if not (callable(contains_mm) and contains_mm()):
        why = out_of_vocab(input_ids, vocab_size)
        if why:
            return why
    return sampling_params_problem(getattr(obj, "sampling_params", None), _sampling_fields(sampling_cls))


# ------------------------------------------------------------------------------------------------ the hooks
def around_validate_one_request(orig: Callable, tokenizer_manager: Any, obj: Any, input_ids: Any, *args: Any,
                                **kwargs: Any) -> Any:
    """AROUND ``TokenizerManager._validate_one_request(obj, input_ids)``: refuse (``ValueError``: a 400 with the
    message) what :func:`check_request` finds, on FreeKV servers; then SGLang's own checks."""
    if freekv_requested(getattr(tokenizer_manager, "server_args", None)):
        why = check_request(obj, input_ids, getattr(tokenizer_manager.model_config, "vocab_size", None),
                            getattr(tokenizer_manager, "sampling_params_class", None))
        if why:
            raise ValueError(why)
    return orig(tokenizer_manager, obj, input_ids, *args, **kwargs)


def before_add_request_to_queue(scheduler: Any, req: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE ``Scheduler._add_request_to_queue(req, is_retracted=False)``: end a new request whose prompt holds
    ids outside the vocabulary with SGLang's abort (status 400, the message) instead of letting it reach the
    embedding. Requests SGLang already ends, retracted ones (checked on arrival), multimodal ones and ones given
    as embeddings are left alone."""
    retracted = kwargs.get("is_retracted", args[0] if args else False)
    if (retracted or getattr(req, "to_finish", None) is not None or getattr(req, "multimodal_inputs", None) is not None
            or getattr(req, "input_embeds", None) is not None):
        return None
    why = out_of_vocab(req.origin_input_ids, scheduler.model_config.vocab_size)
    if why:
        req.set_finish_with_abort(why)  # compat.REQ_SET_FINISH_WITH_ABORT
    return None
