"""Shared fixtures for the CPU test suite.

SGLang needs no accelerator to *parse* server arguments as long as
``--device cpu`` is given, and it reads only ``config.json`` from a local model
folder, so tiny config-only model folders are enough.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "bfloat16",
}

MLA_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "kv_lora_rank": 32,
    "q_lora_rank": None,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "max_position_embeddings": 4096,
}


def _model_dir(root: Path, name: str, config: dict) -> str:
    path = root / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A folder holding only a small Llama config.json."""
    return _model_dir(tmp_path_factory.mktemp("models"), "tiny-llama", LLAMA_CONFIG)


@pytest.fixture(scope="session")
def mla_model(tmp_path_factory) -> str:
    """A folder holding only a DeepSeek-V3-style (MLA) config.json."""
    return _model_dir(tmp_path_factory.mktemp("models"), "tiny-mla", MLA_CONFIG)


@pytest.fixture(scope="session")
def base_argv(tiny_model) -> list[str]:
    """Arguments every parse needs on a CPU-only machine (seed fixed for comparisons)."""
    return ["--model-path", tiny_model, "--device", "cpu", "--random-seed", "0"]


def _run_python(args: list[str], env_extra: dict | None = None, timeout: int = 180,
                cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` in a fresh interpreter, outside the repo root.

    (With the repo root on ``sys.path``, ``import kernels`` would find this
    repo's ``kernels/`` folder instead of the Hugging Face package.)
    """
    env = dict(os.environ)
    env.pop("SGLANG_FREEKV_CONFIG", None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout,
        env=env, cwd=cwd or tempfile.gettempdir(),
    )


@pytest.fixture(scope="session")
def run_python():
    """``run_python(args, env_extra=None, timeout=180)``: a subprocess ``python ARGS``."""
    return _run_python



def _module_under_interpreter(test_file: str) -> None:
    """Runs the test module ``test_file`` again in a child pytest with ``TRITON_INTERPRET=1`` (the interpreter is
    chosen when Triton is imported), outside the repo root; asserts that its tests passed."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("SGLANG_FREEKV_CONFIG", None)
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(test_file)],
        env=env, capture_output=True, text=True, timeout=900, cwd=tempfile.gettempdir(),
    )
    assert r.returncode == 0, f"interpreter run failed:\n{r.stdout[-8000:]}\n{r.stderr[-4000:]}"
    assert " passed" in r.stdout


@pytest.fixture(scope="session")
def module_under_interpreter():
    """``module_under_interpreter(__file__)``: the module's tests again in a child pytest under Triton's CPU
    interpreter, asserted to pass."""
    return _module_under_interpreter


def _code_under_interpreter(code: str) -> None:
    """Runs ``python -c code`` with ``TRITON_INTERPRET=1`` in ``tests/`` (so that the ``*_cases`` modules import;
    not the repository root: kernels/ would shadow HF kernels); asserts that it exits 0 printing ``ok`` last."""
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", code], cwd=here, env=dict(os.environ, TRITON_INTERPRET="1"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-3000:] + r.stderr[-6000:]


@pytest.fixture(scope="session")
def code_under_interpreter():
    """``code_under_interpreter(code)``: ``python -c code`` under Triton's CPU interpreter in ``tests/``, asserted
    to exit 0 printing ``ok`` last."""
    return _code_under_interpreter
