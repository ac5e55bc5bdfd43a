"""Start a stock ``sglang.launch_server`` in a subprocess, talk to it, stop it.

Used by the GPU end-to-end tests and the benchmarks: they run the server exactly the way
a user would (``python -m sglang.launch_server ... --kv-retrieval freekv``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from freekv_sglang.settings import child_environ


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _get(url: str, timeout: float) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, ""


@dataclass
class Server:
    """A running ``sglang.launch_server`` process."""

    args: list[str]
    port: int = 30000
    log_path: str = "server.log"
    proc: subprocess.Popen | None = None
    started: float = 0.0
    ready_after: float | None = None
    env: dict = field(default_factory=dict)
    start_timeout: float = 300.0  # seconds until /health answers (``with Server(...)``)
    module: str = "sglang.launch_server"  # or "freekv_sglang.serve"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float | None = None) -> "Server":
        """Launch the server and wait until ``/health`` answers."""
        return self.launch().wait_healthy(timeout)

    def launch(self) -> "Server":
        """Start the server process without waiting (see :meth:`wait_healthy`)."""
        if port_in_use(self.port):
            # another server (e.g. a leftover of an interrupted run) would answer our requests
            raise RuntimeError(f"port {self.port} on 127.0.0.1 is already in use; stop the process listening there "
                               f"or choose another port")
        cmd = [sys.executable, "-m", self.module, *self.args, "--host", "127.0.0.1", "--port", str(self.port)]
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        self.log = open(self.log_path, "w")
        self.log.write("$ " + " ".join(cmd) + "\n")
        self.log.flush()
        self.started = time.time()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=child_environ(self.env))
        return self

    def wait_healthy(self, timeout: float | None = None) -> "Server":
        """Wait until ``/health`` answers 200; stops the server and raises on exit or timeout."""
        timeout = self.start_timeout if timeout is None else timeout
        deadline = self.started + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before becoming healthy; "
                                   f"see {self.log_path}:\n{self.tail()}")
            try:
                if _get(self.base + "/health", 2)[0] == 200:
                    self.ready_after = time.time() - self.started
                    return self
            except OSError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout:.0f}s; see {self.log_path}:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if getattr(self, "log", None):
            self.log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ requests
    def generate(self, input_ids: list[int], max_new_tokens: int, timeout: float = 600.0, rid: str | None = None,
                 top_logprobs: int = 0, **sampling) -> dict:
        """Greedy ``/generate`` (``ignore_eos``); ``rid`` names the request (for ``/abort_request``);
        ``top_logprobs > 0`` also returns each generated token's log-probability and the ``top_logprobs``
        most likely tokens at each step (``meta_info``; read with
        :func:`freekv_sglang.testing.greedy_compare.GreedyTrace.from_response`)."""
        params = {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True, **sampling}
        body = {"input_ids": input_ids, "sampling_params": params}
        if rid is not None:
            body["rid"] = rid
        if top_logprobs:
            body.update(return_logprob=True, top_logprobs_num=top_logprobs)
        return _post(self.base + "/generate", body, timeout)

    def generate_many(self, prompts: list[list[int]], max_new_tokens, timeout: float = 900.0,
                      top_logprobs: int = 0) -> list[dict]:
        """Send all prompts at once (concurrently), return the responses in order.

        ``max_new_tokens``: one int for all, or one per prompt.
        """
        news = max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
        with ThreadPoolExecutor(max_workers=max(1, len(prompts))) as ex:
            futs = [ex.submit(self.generate, p, n, timeout, top_logprobs=top_logprobs) for p, n in zip(prompts, news)]
            return [f.result() for f in futs]

    def completion(self, prompt: list[int] | str, max_tokens: int, timeout: float = 600.0) -> dict:
        body = {"model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True}
        return _post(self.base + "/v1/completions", body, timeout)

    def chat(self, messages: list[dict], max_tokens: int, timeout: float = 600.0) -> dict:
        """Greedy OpenAI-style ``/v1/chat/completions``."""
        body = {"model": "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        return _post(self.base + "/v1/chat/completions", body, timeout)

    def server_info(self) -> dict:
        code, text = _get(self.base + "/server_info", 10)
        return json.loads(text) if code == 200 and text else {}

    def metrics(self) -> str:
        """The Prometheus text of ``/metrics`` (``--enable-metrics``); empty if not served."""
        code, text = _get(self.base + "/metrics", 10)
        return text if code == 200 else ""

    def post(self, path: str, body: dict, timeout: float = 600.0) -> dict:
        """POST ``body`` as JSON to ``path`` and return the JSON answer."""
        return _post(self.base + path, body, timeout)


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def output_ids(resp: dict) -> list[int]:
    """Generated token ids of a ``/generate`` response."""
    if "output_ids" in resp:
        return list(resp["output_ids"])
    return list(resp.get("meta_info", {}).get("output_ids", []))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def write_report(out_dir: str, script: str, model: str, argv: list[str], body: str) -> str:
    """Write a served benchmark's Markdown (card, model, command, ``body``) to ``out_dir/<script stem>.md``
    and return it."""
    import shlex

    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    name = os.path.splitext(os.path.basename(script))[0]
    text = (f"card: {card}; model: {model} (dummy weights)\n\ncommand: `python launch/{name}.py "
            f"{shlex.join(argv)}`\n\n{body}")
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(text + "\n")
    return text
