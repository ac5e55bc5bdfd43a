"""The GPU server tests' launcher (tests/gpu/test_server_e2e.py, imported here without a GPU) loads a
folder's weights when it has them and uses dummy weights only for the weightless shape folders."""

import os
import runpy

HERE = os.path.dirname(os.path.abspath(__file__))


def test_weights_are_loaded_when_the_folder_has_them(tmp_path):
    mod = runpy.run_path(os.path.join(HERE, "gpu", "test_server_e2e.py"))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with_weights = mod["server"]("x", "--kv-retrieval", "freekv", model=str(tmp_path), tokenizer="tok").args
    shape_only = mod["server"]("y", model=str(tmp_path / "absent"), tokenizer="tok").args
    assert "dummy" not in with_weights and with_weights[with_weights.index("--model-path") + 1] == str(tmp_path)
    assert shape_only[shape_only.index("--load-format") + 1] == "dummy"
