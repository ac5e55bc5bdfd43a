"""The ``--kv-retrieval`` / ``--freekv-*`` flags, generated from :class:`FreeKVConfig`'s field metadata.

:func:`add_freekv_arguments` adds them to any argparse parser (SGLang's, through the plugin hook, or a script's);
:func:`flag_table` renders them as docs/USAGE.md's table. Argparse only converts types and checks choices; the
validation is :class:`~freekv_sglang.config.FreeKVConfig`'s, built with :meth:`FreeKVConfig.from_namespace`.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Iterator

from freekv_sglang.config import FLAG_OF_FIELD, FreeKVConfig, dest_of_field, shown_default

GROUP_TITLE = "FreeKV KV retrieval"
GROUP_DESCRIPTION = ("KV-cache retrieval: full KV in pinned host memory, a small GPU working set per request "
                     "(sink + selected + recent-window pages), speculative page selection.")


def freekv_flags() -> Iterator[tuple[str, dict[str, Any], str]]:
    """``(flag, add_argument options, shown default)`` of each flag in field order, aliases (default ``""``) last."""
    for f in dataclasses.fields(FreeKVConfig):
        options = dict(f.metadata["argparse"])
        aliases = options.pop("aliases", {})
        common = {"dest": dest_of_field(f.name), "default": options.pop("default", f.default)}
        yield f.metadata["flag"], {**common, **options, "help": f.metadata["help"]}, shown_default(f)
        for flag, extra in aliases.items():
            yield flag, {**common, **extra}, ""


def has_freekv_arguments(parser: argparse.ArgumentParser) -> bool:
    """True if ``parser`` already has the FreeKV flags (makes adding idempotent)."""
    return FLAG_OF_FIELD["enabled"] in parser._option_string_actions


def add_freekv_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the FreeKV flags to ``parser`` in a group titled "FreeKV KV retrieval"."""
    if has_freekv_arguments(parser):
        return
    g = parser.add_argument_group(GROUP_TITLE, GROUP_DESCRIPTION)
    for flag, options, shown in freekv_flags():
        text = options["help"] + (f" Default: {shown}." if shown else "")
        g.add_argument(flag, **{**options, "help": text.replace("%", "%%")})


def flag_table() -> str:
    """docs/USAGE.md's flag table (Markdown), from the same metadata as the parser."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for flag, options, shown in freekv_flags():
        choices = options.get("choices")
        arg = "{" + ",".join(choices) + "}" if choices else options.get("metavar")
        cells = (f"`{flag} {arg}`" if arg else f"`{flag}`", f"`{shown}`" if shown else "", options["help"])
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"
