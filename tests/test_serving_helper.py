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


def test_log_folder_is_created(tmp_path, monkeypatch):
    """A log path in a folder that does not exist yet (e.g. under a fresh ``$OUT``) is created."""
    import freekv_sglang.serving as serving

    class Exited:
        returncode = 1

        def __init__(self, cmd, stdout=None, **kw):
            stdout.write("launched\n")

        def poll(self):
            return 1

    monkeypatch.setattr(serving.subprocess, "Popen", Exited)
    log = tmp_path / "new" / "dir" / "server.log"
    s = Server(["--model-path", "unused"], port=1, log_path=str(log))
    monkeypatch.setattr(serving, "port_in_use", lambda port: False)
    with pytest.raises(RuntimeError, match="exited with 1"):
        s.start(timeout=5)
    s.log.close()
    assert "launched" in log.read_text()
