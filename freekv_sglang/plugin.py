"""SGLang plugin entry point: ``[sglang.srt.plugins] freekv = freekv_sglang.plugin:register``.

SGLang calls :func:`register` in every process that runs ``load_plugins()``:
the launcher (before parsing arguments), the offline ``Engine`` and each
scheduler (one per TP rank). It

* adds ``freekv`` to the attention-backend choices and hooks
  ``ServerArgs.add_cli_args`` (AFTER: adds the flags),
  ``ServerArgs.from_cli_args`` (AROUND: validates, rewrites base arguments
  before SGLang resolves them, attaches ``_freekv``) and
  ``TokenizerManager._validate_one_request`` (AROUND: on FreeKV servers, refuses
  token ids outside the vocabulary and mistyped sampling parameters with a 400,
  :mod:`freekv_sglang.request_checks`);
* in scheduler processes, when FreeKV was requested, installs the runtime
  (``freekv_sglang.runtime.integration.install_runtime_hooks``). A failure there
  ends the process: a requested ``--kv-retrieval freekv`` never runs dense.

Nothing here touches CUDA; the HTTP main process stays free of GPU work.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import traceback
from typing import Any, Callable, NoReturn

from freekv_sglang import compat
from freekv_sglang.cli import add_freekv_arguments
from freekv_sglang.config import ENV_VAR, FreeKVConfig, FreeKVConfigError
from freekv_sglang.request_checks import around_validate_one_request
from freekv_sglang.server_config import (
    LOG_PREFIX,
    announce,
    clear_exported_config,
    emit,
    finalize_server_args,
    prepare_values,
)


_version_checked = False
_runtime_installed = False


def register() -> None:
    """Plugin entry point; safe to call more than once per process."""
    global _version_checked
    if not _version_checked:
        compat.check_sglang_version()
        _version_checked = True
    compat.add_attention_backend_choice()
    compat.register_hook(compat.SERVER_ARGS_ADD_CLI_ARGS, _after_add_cli_args, "AFTER")
    compat.register_hook(compat.SERVER_ARGS_FROM_CLI_ARGS, _around_from_cli_args, "AROUND")
    # the HTTP server's request checks run in the launcher, where this runs before the arguments are parsed:
    # the hook asks per request whether the server runs FreeKV
    compat.register_hook(compat.TOKENIZER_MANAGER_VALIDATE_ONE_REQUEST, around_validate_one_request, "AROUND")
    if is_child_process():
        install_runtime_if_requested()


def is_child_process() -> bool:
    """True in processes SGLang spawned (schedulers), False in the launcher."""
    return multiprocessing.parent_process() is not None


# ----------------------------------------------------------------- CLI hooks
def _after_add_cli_args(_result: Any, parser: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``ServerArgs.add_cli_args(parser)``: add the FreeKV flag group."""
    add_freekv_arguments(parser)


def _around_from_cli_args(orig: Callable, cls: type, ns: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND ``ServerArgs.from_cli_args(ns)``.

    Pops the FreeKV attributes off the namespace. Disabled: returns exactly what
    SGLang would. Enabled: validates, rewrites base arguments, lets SGLang
    resolve, re-checks, attaches ``_freekv``. Any FreeKV error exits with code 2.
    """
    try:
        cfg = FreeKVConfig.from_namespace(ns)
        if not cfg.enabled:
            clear_exported_config()
            return orig(cls, ns, *args, **kwargs)
        pinned, notes = prepare_values(vars(ns), cfg)
    except FreeKVConfigError as e:
        exit_with_error(e)
    announce(cfg, notes)
    sa = orig(cls, ns, *args, **kwargs)
    try:
        return finalize_server_args(sa, pinned)
    except FreeKVConfigError as e:
        exit_with_error(e)


def exit_with_error(err: BaseException) -> NoReturn:
    """Print a FreeKV configuration error and exit with status 2 (like argparse)."""
    print(f"{LOG_PREFIX} error: {err}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# ---------------------------------------------------------- scheduler runtime
def install_runtime_if_requested() -> bool:
    """Install the FreeKV runtime hooks if ``SGLANG_FREEKV_CONFIG`` enables FreeKV.

    Returns True if installed (now or earlier). Raises ``SystemExit`` on any
    failure: ``load_plugins()`` only logs ordinary exceptions, which would let
    the server come up dense.
    """
    global _runtime_installed
    if _runtime_installed:
        return True
    try:
        cfg = FreeKVConfig.from_env()
    except FreeKVConfigError as e:
        _runtime_failure(e)
    if cfg is None or not cfg.enabled:
        return False
    try:
        from freekv_sglang.runtime.integration import install_runtime_hooks

        install_runtime_hooks(cfg)
    except Exception as e:  # noqa: BLE001 - any failure must stop the process
        _runtime_failure(e)
    _runtime_installed = True
    return True


def _runtime_failure(err: BaseException) -> NoReturn:
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    msg = (
        "FreeKV was requested (--kv-retrieval freekv, via "
        f"{ENV_VAR}) but its runtime could not be installed: {err!r}. "
        "Refusing to run without it."
    )
    emit(logging.ERROR, f"{msg}\n{tb}")
    raise SystemExit(f"{LOG_PREFIX} {msg}")
