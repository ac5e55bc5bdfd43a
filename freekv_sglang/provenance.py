"""Where a measurement was taken: the checkout's commit, the package versions, the card and the host.

Every benchmark and measurement script records these beside its figures (``docs/BENCHMARKS.md`` asks for
commit, versions, card and command with every raw record).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout when run from a source tree
PACKAGES = ("torch", "triton", "flashinfer-python", "sglang", "transformers", "freekv-sglang")


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=10)


def commit_id(given: str | None = None) -> str:
    """``given`` if set, else the checkout's short HEAD with ``+changes`` when tracked files differ from it;
    ``unknown (pass --commit)`` outside a git checkout (e.g. an installed package)."""
    if given:
        return given
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown (pass --commit)"
    if head.returncode != 0 or not head.stdout.strip():
        return "unknown (pass --commit)"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")



def command_line(module: str, argv=None) -> str:
    """``python -m <module>`` with ``argv`` (``sys.argv[1:]`` when ``None``), as recorded beside results."""
    return f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)


def record(script: str, argv: list[str], commit: str | None = None) -> dict:
    """Provenance of one run of ``script`` (a path like ``launch/bench_prefix.py``) with ``argv``: commit,
    package versions, card, host, command and start time (UTC)."""
    return {"commit": commit_id(commit), "versions": versions(), "card": card(), "host": host(),
            "command": f"python {script} " + shlex.join(argv),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_json(path: str, obj) -> None:
    """``obj`` to ``path`` as JSON indented by one, with a final newline."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def versions(packages=PACKAGES) -> dict:
    """``{distribution: version or None}``."""
    from importlib import metadata

    out = {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def card() -> str:
    """GPU 0 as ``nvidia-smi`` names it, with its memory and driver; ``unknown`` without one."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader",
                            "-i", "0"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown (no nvidia-smi)"
    parts = [x.strip() for x in r.stdout.strip().split(",")]
    if r.returncode != 0 or len(parts) != 3:
        return "unknown"
    return f"{parts[0]} ({parts[1]}, driver {parts[2]})"


def host() -> dict:
    """CPU count and physical RAM (GiB) of this machine."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpus": os.cpu_count(), "ram_gib": round(ram, 1)}
