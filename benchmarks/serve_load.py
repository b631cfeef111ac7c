"""A bounded load test of `vllm serve` of a BitsMoE checkpoint: concurrent streaming completions and chat requests
(half each) with malformed requests among them, then a health check and one more request. Counts failures,
records each malformed request's HTTP status, and p50/p99 latency and tokens/s. tests/test_serve_load.py runs it
on a tiny checkpoint; standalone it quantizes a tiny model, serves it with default settings and writes JSON:

    .venv/bin/python -m benchmarks.serve_load [--requests 64] [--out benchmarks/results/serve_load_cpu.json]
"""

import argparse
import json
import statistics
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

from benchmarks.bench_serve import build_demo
from benchmarks.machine import describe
from bitsmoe_vllm.local_server import get, stream, vllm_server

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Return the sum of a start value and an iterable of numbers"


def malformed(model: str) -> dict[str, tuple[str, bytes, int]]:
    """name -> (path, request body, the HTTP status a well-behaved server answers)."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8}
    return {
        "bad JSON": ("/v1/completions", b'{"model": "' + model.encode() + b'", "prompt": ', 400),
        "max_tokens too large": ("/v1/completions", json.dumps({**body, "max_tokens": 10**7}).encode(), 400),
        "negative max_tokens": ("/v1/completions", json.dumps({**body, "max_tokens": -5}).encode(), 400),
        "unknown model": ("/v1/completions", json.dumps({**body, "model": "no-such-model"}).encode(), 404),
        "chat without messages": ("/v1/chat/completions", json.dumps({"model": model}).encode(), 400),
    }


def send_raw(url: str, path: str, data: bytes) -> int:
    """HTTP status of a POST with `data` as the body."""
    request = urllib.request.Request(f"{url}{path}", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def one_stream(url: str, model: str, i: int, max_tokens: int) -> dict:
    """Request i: a streamed completion (even i) or chat (odd i); its latency and tokens."""
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    if i % 2:
        path, body = "/v1/chat/completions", body | {"messages": [{"role": "user", "content": f"{PROMPT} ({i})"}]}
    else:
        path, body = "/v1/completions", body | {"prompt": f"{PROMPT} ({i})"}
    start = time.perf_counter()
    try:
        events = stream(url, path, body, timeout=300)
    except Exception as err:  # counted and reported: a failed well-formed request is what this test is for
        return {"ok": False, "error": f"{type(err).__name__}: {err}"}
    tokens = events[-1]["usage"]["completion_tokens"]
    return {
        "ok": tokens == max_tokens,
        "latency_s": time.perf_counter() - start,
        "tokens": tokens,
        "error": None if tokens == max_tokens else f"{tokens} tokens, not {max_tokens}",
    }


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def run_load(url: str, model: str, requests: int = 64, max_tokens: int = 32) -> dict:
    bad = malformed(model)
    start = time.perf_counter()
    with ThreadPoolExecutor(requests + len(bad)) as pool:
        streams = [pool.submit(one_stream, url, model, i, max_tokens) for i in range(requests)]
        statuses = {name: pool.submit(send_raw, url, path, data) for name, (path, data, _) in bad.items()}
        results = [f.result() for f in streams]
        statuses = {name: f.result() for name, f in statuses.items()}
    wall = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    latencies = [r["latency_s"] for r in ok]
    try:
        healthy = urllib.request.urlopen(f"{url}/health", timeout=30).status == 200 and bool(
            get(url, "/v1/models")["data"]
        )
        healthy = healthy and one_stream(url, model, 0, 4)["ok"]
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        healthy = False
    return {
        "requests": requests,
        "max_tokens": max_tokens,
        "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if not r["ok"]})[:5],
        "malformed": {name: {"status": statuses[name], "expected": bad[name][2]} for name in bad},
        "healthy_after": healthy,
        "wall_s": round(wall, 2),
        "latency_s": {"p50": round(percentile(latencies, 50), 3), "p99": round(percentile(latencies, 99), 3)}
        if latencies
        else None,
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve_load_cpu.json")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shape = SimpleNamespace(arch="mixtral", layers=2, hidden=64, experts=16, intermediate=128, bits=2.5)
        _, bitsmoe = build_demo(tmp, shape)
        with vllm_server(bitsmoe, "--max-model-len", "512", log=tmp / "server.log", timeout=600) as url:
            result = run_load(url, str(bitsmoe), a.requests, a.max_tokens)
    result = {
        "machine": describe(),
        "model": "tiny Mixtral (H 64, 2 layers, E 16, I 128), BitsMoE 2.5 bits",
        "vllm_settings": "default, --max-model-len 512",
        **result,
    }
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
