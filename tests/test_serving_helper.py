"""The server helper refuses a port that something else already answers on (a leftover server
would otherwise serve the test's requests)."""

import socket

import pytest

from freekv_sglang.serving import Server, port_in_use


def test_port_in_use_is_refused_before_launch(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        assert port_in_use(port)
        s = Server(["--model-path", "unused"], port=port, log_path=str(tmp_path / "server.log"))
        with pytest.raises(RuntimeError, match=f"port {port}"):
            s.start(timeout=5)
        assert s.proc is None  # nothing was launched
    assert not port_in_use(port)
