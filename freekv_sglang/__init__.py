"""freekv-sglang: FreeKV KV-cache retrieval for SGLang, enabled with ``--kv-retrieval freekv``.

Importing this package does not import SGLang (``freekv_sglang.algorithm`` works
without it). The SGLang-facing pieces are loaded on first use.
"""

from __future__ import annotations

import os
from typing import Any

# In a source checkout the kernels live in the top-level ``kernels/`` folder, which an
# installed distribution places at ``freekv_sglang/kernels``. When this package is
# imported from the checkout itself (e.g. a server started from the repository root puts
# it first on sys.path), let ``freekv_sglang.kernels`` resolve to that folder.
_here = os.path.dirname(os.path.abspath(__file__))
if not os.path.isdir(os.path.join(_here, "kernels")) and os.path.isfile(
        os.path.join(_here, os.pardir, "kernels", "__init__.py")):
    __path__.append(os.path.join(_here, os.pardir))  # noqa: F821 - package __path__

__version__ = "0.1.0"

__all__ = ["__version__", "make_server_args"]


def make_server_args(**kwargs: Any) -> Any:
    """Build ``sglang.srt.server_args.ServerArgs`` for the offline Engine, FreeKV included.

    Takes the usual ServerArgs keyword arguments plus ``kv_retrieval="freekv"``
    and ``freekv_*`` options (``freekv_page_size``, ``freekv_sink_tokens``...,
    the CLI dests). Applies the same validation and base-argument overrides as
    the command line, attaches the config as ``_freekv`` and exports it for the
    scheduler processes. Raises ``FreeKVConfigError`` on a bad value.

    Example::

        import sglang, freekv_sglang
        engine = sglang.Engine(server_args=freekv_sglang.make_server_args(
            model_path="meta-llama/Llama-3.1-8B-Instruct", kv_retrieval="freekv"))
    """
    from freekv_sglang.server_config import build_server_args

    return build_server_args(kwargs)
