"""`vllm serve` of a BitsMoE checkpoint against the same model unquantized: startup time, memory of the
server's processes, single-stream and 8-stream decode tokens/s, measured with the OpenAI client.
Default vLLM settings (bfloat16, torch.compile). The two servers take turns, `--pairs` times (this VM's speed
drifts over minutes); the JSON has every run, the medians and each pair's ratio. Writes JSON to
benchmarks/results/.

Each of the 8 streams has a prompt of its own: with one prompt for all, greedy decoding gives 8 copies of one
sequence, every token of a step picks the same experts, and the 8-stream figure measures 2 experts per layer
(runs before 2026-11-23 did that).

    .venv/bin/python benchmarks/bench_serve.py --hidden 512 --experts 16 --intermediate 512 --layers 4
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from openai import OpenAI

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.machine import describe  # noqa: E402
from bitsmoe_vllm.local_server import vllm_server  # noqa: E402

PROMPTS = [  # one per stream
    "Return the sum of a start value and an iterable of numbers",
    "The river rose through the night and by morning",
    "def parse_header(line):",
    "Three reasons the bridge was closed last winter:",
    "In 1848 the first telegraph line across the valley",
    "SELECT name, count(*) FROM orders GROUP BY",
    "She opened the letter, read the first line, and",
    "Chapter 4. Measuring heat flow in thin films",
]


def server_rss_mb(url: str) -> float:
    """Resident memory of the process listening on url's port and all its children (API server, engine, worker)."""
    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
            root = psutil.Process(conn.pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
    raise RuntimeError(f"no process listens on port {port}")


def decode_rate(client: OpenAI, model: str, streams: int, tokens: int, rounds: int) -> float:
    """Generated tokens per second with `streams` concurrent requests of `tokens` tokens (stream i prompted with
    PROMPTS[i]), over `rounds` rounds."""

    def one(stream):
        r = client.completions.create(
            model=model, prompt=PROMPTS[stream], max_tokens=tokens, temperature=0, extra_body={"ignore_eos": True}
        )
        return r.usage.completion_tokens

    start, total = time.perf_counter(), 0
    with ThreadPoolExecutor(streams) as pool:
        for _ in range(rounds):
            total += sum(pool.map(one, range(streams)))
    return total / (time.perf_counter() - start)


def measure(model: Path, log: Path, tokens: int) -> dict:
    start = time.perf_counter()
    with vllm_server(model, "--max-model-len", "512", log=log, timeout=600) as url:
        startup = time.perf_counter() - start
        client = OpenAI(base_url=f"{url}/v1", api_key="none")
        decode_rate(client, str(model), 1, 16, 1)  # warm-up
        single = decode_rate(client, str(model), 1, tokens, 3)
        eight = decode_rate(client, str(model), 8, tokens, 2)
        rss = server_rss_mb(url)
    return {
        "startup_seconds": round(startup, 1),
        "server_rss_mb": round(rss),
        "tokens_per_s_1_stream": round(single, 1),
        "tokens_per_s_8_streams": round(eight, 1),
    }


def build_models(
    tmp: Path, arch: str, layers: int, hidden: int, experts: int, intermediate: int, bits: float
) -> tuple[Path, Path]:
    """A tiny random model of `arch` in tmp/model and its BitsMoE checkpoint in tmp/bitsmoe, on local text."""
    model, bitsmoe, text = tmp / "model", tmp / "bitsmoe", tmp / "text.txt"
    shape = [
        "--layers",
        str(layers),
        "--experts",
        str(experts),
        "--intermediate",
        str(intermediate),
        "--hidden",
        str(hidden),
    ]
    subprocess.run(
        [sys.executable, "-m", "bitsmoe_vllm.offline.demo", str(model), "--arch", arch, *shape, "--text", str(text)],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    quantize = ["--model", str(model), "--out", str(bitsmoe), "--bits", str(bits), "--calib", str(text)]
    quantize += ["--calib-tokens", "2048", "--calib-seq-len", "128"]
    quantize += ["--basis-dtype", "int8"]  # random weights share nothing: auto would take the identity
    subprocess.run([sys.executable, "-m", "bitsmoe_vllm.offline", *quantize], check=True, cwd=REPO, capture_output=True)
    return model, bitsmoe


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="mixtral")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--bits", type=float, default=2.5)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--pairs", type=int, default=3, help="runs of each server, taking turns")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_cpu.json"))
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        servers = dict(
            zip(
                ("unquantized", "bitsmoe"),
                build_models(tmp, a.arch, a.layers, a.hidden, a.experts, a.intermediate, a.bits),
            )
        )
        size = {name: sum(f.stat().st_size for f in d.glob("*.safetensors")) / 2**20 for name, d in servers.items()}
        quantization = json.loads((servers["bitsmoe"] / "config.json").read_text())["quantization_config"]
        runs = {name: [] for name in servers}
        for pair in range(a.pairs):
            for name, d in servers.items():
                runs[name].append(measure(d, tmp / f"{name}.log", a.tokens) | {"safetensors_mb": round(size[name], 1)})
                print(pair, name, runs[name][-1], flush=True)
    rates = ("tokens_per_s_1_stream", "tokens_per_s_8_streams")
    median = {name: {k: statistics.median(r[k] for r in rs) for k in rates} for name, rs in runs.items()}
    ratios = [{k: round(b[k] / u[k], 2) for k in rates} for u, b in zip(runs["unquantized"], runs["bitsmoe"])]
    bases_and_bits = {k: quantization[k] for k in ("basis_dtype", "achieved_bits")}
    result = {
        "machine": describe(),
        "model": vars(a) | {"out": None} | bases_and_bits,
        "median": median,
        "bitsmoe_over_unquantized": ratios,
        "runs": runs,
    }
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
