"""`vllm serve` of a BitsMoE checkpoint against the same model unquantized (bf16): startup time, memory of the
server's processes, decode tokens/s at 1, 8 and 32 streams, and prefill: the time to the first token of a
2048-token prompt and its tokens/s, measured with the OpenAI client. Default vLLM settings (bfloat16,
torch.compile, prefix caching: every prefill prompt is new). The two servers take turns, `--pairs` times (this VM's
speed drifts over minutes); the JSON has every run, the medians, the spreads (min, max) and each pair's ratio. Writes
JSON to benchmarks/results/.

Models (`--model`):
- demo: a random model of `--arch` and the given shape (`bitsmoe-demo-model`), int8 bases;
- trained-moe: the Qwen3-MoE trained from scratch (benchmarks/models/trained-moe), quantized with default options
  on its calibration split;
- qwen3-30b-a3b: `--layers` layers of Qwen3-30B-A3B's shapes (H 2048, 32 query and 4 key/value heads of 128, 128
  experts of I 768, top-8) with random weights and the demo's small vocabulary, int8 bases.

Each stream has a prompt of its own: with one prompt for all, greedy decoding gives copies of one sequence, every
token of a step picks the same experts, and the multi-stream figure measures 2 experts per layer (runs before
2026-11-23 did that).

    .venv/bin/python benchmarks/bench_serve.py --model qwen3-30b-a3b --layers 2
"""

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import transformers
from openai import AsyncOpenAI, OpenAI

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.corpus import write_splits  # noqa: E402
from benchmarks.machine import describe  # noqa: E402
from bitsmoe_vllm.local_server import vllm_server  # noqa: E402
from bitsmoe_vllm.offline.demo import corpus, train_tokenizer, write_random_model  # noqa: E402

PROMPTS = [  # one per stream, and four variants of each for 32 streams
    f"{start}{variant}"
    for variant in ("", " Then", " Also,", " Finally")
    for start in (
        "Return the sum of a start value and an iterable of numbers",
        "The river rose through the night and by morning",
        "def parse_header(line):",
        "Three reasons the bridge was closed last winter:",
        "In 1848 the first telegraph line across the valley",
        "SELECT name, count(*) FROM orders GROUP BY",
        "She opened the letter, read the first line, and",
        "Chapter 4. Measuring heat flow in thin films",
    )
]
ROUNDS = {1: 3, 8: 2, 32: 1}  # decode requests per stream, by streams
PREFILL_TOKENS = 2048
QWEN3_30B_A3B = dict(  # its config.json's shapes
    hidden_size=2048,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    moe_intermediate_size=768,
    num_experts_per_tok=8,
    intermediate_size=6144,
    norm_topk_prob=True,
)


def server_rss_mb(url: str) -> float:
    """Resident memory of the process listening on url's port and all its children (API server, engine, worker)."""
    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
            root = psutil.Process(conn.pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
    raise RuntimeError(f"no process listens on port {port}")


def decode_rate(url: str, model: str, streams: int, tokens: int, rounds: int) -> float:
    """Generated tokens per second with `streams` concurrent requests of `tokens` tokens (stream i prompted with
    PROMPTS[i]), over `rounds` rounds. Each round's requests go out together from one event loop: a pool of threads
    started some of them only as others ended here (up to 1.2 s late at 32 streams; the server's worker holds one of
    the two cores, its engine, its API server and this client share the other)."""

    async def rounds_of_requests() -> float:
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", timeout=900)

        async def one(stream: int) -> int:
            r = await client.completions.create(
                model=model, prompt=PROMPTS[stream], max_tokens=tokens, temperature=0, extra_body={"ignore_eos": True}
            )
            return r.usage.completion_tokens

        start, total = time.perf_counter(), 0
        for _ in range(rounds):
            total += sum(await asyncio.gather(*(one(s) for s in range(streams))))
        elapsed = time.perf_counter() - start
        await client.close()
        return total / elapsed

    return asyncio.run(rounds_of_requests())


def first_token_seconds(client: OpenAI, model: str, prompt: list[int]) -> float:
    """Seconds to the first token of one request with these prompt token ids (its prefill, and one sampling step)."""
    start = time.perf_counter()
    client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0)
    return time.perf_counter() - start


def measure(model: Path, log: Path, tokens: int, vocab: int, seed: int) -> dict:
    g = random.Random(seed)  # prompts no earlier run of this server saw: nothing from the prefix cache
    prompts = [[g.randrange(vocab) for _ in range(PREFILL_TOKENS)] for _ in range(4)]
    start = time.perf_counter()
    with vllm_server(model, "--max-model-len", str(2 * PREFILL_TOKENS), log=log, timeout=900) as url:
        startup = time.perf_counter() - start
        client = OpenAI(base_url=f"{url}/v1", api_key="none", timeout=900)
        for n in ROUNDS:  # warm-up: torch.compile's first calls at each batch size compile
            decode_rate(url, str(model), n, 16, 1)
        first_token_seconds(client, str(model), prompts[0])  # warm-up of the long-prompt shapes
        rates = {
            f"tokens_per_s_{n}_streams": decode_rate(url, str(model), n, tokens, rounds) for n, rounds in ROUNDS.items()
        }
        ttft = statistics.median(first_token_seconds(client, str(model), p) for p in prompts[1:])
        rss = server_rss_mb(url)
    return {
        "startup_seconds": round(startup, 1),
        "server_rss_mb": round(rss),
        **{k: round(v, 1) for k, v in rates.items()},
        "first_token_seconds_2048": round(ttft, 3),
        "prefill_tokens_per_s": round(PREFILL_TOKENS / ttft, 1),
    }


def quantize(model: Path, out: Path, calib: Path, bits: float, *options: str) -> None:
    command = [sys.executable, "-m", "bitsmoe_vllm.offline", "--model", str(model), "--out", str(out)]
    command += ["--bits", str(bits), "--calib", str(calib), *options]
    subprocess.run(command, check=True, cwd=REPO, capture_output=True)


def build_demo(tmp: Path, a) -> tuple[Path, Path]:
    """A tiny random model of a.arch in tmp/model and its BitsMoE checkpoint in tmp/bitsmoe, on local text."""
    model, bitsmoe, text = tmp / "model", tmp / "bitsmoe", tmp / "text.txt"
    shape = ["--layers", str(a.layers), "--experts", str(a.experts), "--intermediate", str(a.intermediate)]
    shape += ["--hidden", str(a.hidden)]
    subprocess.run(
        [sys.executable, "-m", "bitsmoe_vllm.offline.demo", str(model), "--arch", a.arch, *shape, "--text", str(text)],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    # random weights share nothing: auto would take the identity
    quantize(model, bitsmoe, text, a.bits, "--calib-tokens", "2048", "--calib-seq-len", "128", "--basis-dtype", "int8")
    return model, bitsmoe


def write_qwen3_30b_a3b(model: Path, layers: int) -> Path:
    """`layers` layers of Qwen3-30B-A3B's shapes, random weights (as the demo's: N(0, 1/fan-in)) in bf16, with the
    demo's tokenizer, in `model`."""
    tokenizer = train_tokenizer()
    config = transformers.Qwen3MoeConfig(
        **QWEN3_30B_A3B,
        vocab_size=len(tokenizer),
        num_hidden_layers=layers,
        max_position_embeddings=2 * PREFILL_TOKENS,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return write_random_model(config, tokenizer, model, dtype=torch.bfloat16)


def build_qwen3_30b_a3b(tmp: Path, a) -> tuple[Path, Path]:
    """a.layers layers of Qwen3-30B-A3B's shapes, random weights (as the demo's: N(0, 1/fan-in)) in bf16, the demo's
    tokenizer, and its BitsMoE checkpoint with int8 bases on local text (2,048 calibration tokens)."""
    model, bitsmoe, text = tmp / "model", tmp / "bitsmoe", tmp / "text.txt"
    write_qwen3_30b_a3b(model, a.layers)
    text.write_text("\n\n".join(corpus()))
    quantize(model, bitsmoe, text, a.bits, "--calib-tokens", "2048", "--calib-seq-len", "128", "--basis-dtype", "int8")
    return model, bitsmoe


def build_trained_moe(tmp: Path, a) -> tuple[Path, Path]:
    """The trained MoE and its BitsMoE checkpoint with default options, calibrated on its calibration split."""
    model, bitsmoe = REPO / "benchmarks" / "models" / "trained-moe", tmp / "bitsmoe"
    quantize(model, bitsmoe, write_splits(tmp / "text", mixed=True)["calib"], a.bits)
    return model, bitsmoe


BUILD = {"demo": build_demo, "qwen3-30b-a3b": build_qwen3_30b_a3b, "trained-moe": build_trained_moe}
OPTIONS = {  # the options each model takes, recorded with its results
    "demo": ("model", "arch", "layers", "hidden", "experts", "intermediate", "bits", "tokens", "pairs"),
    "qwen3-30b-a3b": ("model", "layers", "bits", "tokens", "pairs"),
    "trained-moe": ("model", "bits", "tokens", "pairs"),
}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=list(BUILD), default="demo")
    p.add_argument("--arch", default="mixtral", help="demo only")
    p.add_argument("--layers", type=int, default=2, help="demo and qwen3-30b-a3b")
    p.add_argument("--hidden", type=int, default=64, help="demo only")
    p.add_argument("--experts", type=int, default=16, help="demo only")
    p.add_argument("--intermediate", type=int, default=128, help="demo only")
    p.add_argument("--bits", type=float, default=2.5)
    p.add_argument("--tokens", type=int, default=128, help="generated per decode request")
    p.add_argument("--pairs", type=int, default=3, help="runs of each server, taking turns")
    p.add_argument("--out", help="default benchmarks/results/serve_cpu_<model>.json")
    a = p.parse_args()
    out = Path(a.out or REPO / "benchmarks" / "results" / f"serve_cpu_{a.model.replace('-', '_')}.json")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        servers = dict(zip(("unquantized", "bitsmoe"), BUILD[a.model](tmp, a)))
        print("quantized", flush=True)
        size = {name: sum(f.stat().st_size for f in d.glob("*.safetensors")) / 2**20 for name, d in servers.items()}
        vocab = json.loads((servers["bitsmoe"] / "config.json").read_text())["vocab_size"]
        quantization = json.loads((servers["bitsmoe"] / "config.json").read_text())["quantization_config"]
        runs = {name: [] for name in servers}
        for pair in range(a.pairs):
            for name, d in servers.items():
                run = measure(d, tmp / f"{name}.log", a.tokens, vocab, seed=pair)
                runs[name].append(run | {"safetensors_mb": round(size[name], 1)})
                print(pair, name, runs[name][-1], flush=True)
    rates = [f"tokens_per_s_{n}_streams" for n in ROUNDS] + ["first_token_seconds_2048", "prefill_tokens_per_s"]
    spreads = {name: {k: spread([r[k] for r in rs]) for k in rates} for name, rs in runs.items()}
    ratios = [{k: round(b[k] / u[k], 2) for k in rates} for u, b in zip(runs["unquantized"], runs["bitsmoe"])]
    bases_and_bits = {k: quantization[k] for k in ("basis_dtype", "achieved_bits")}
    result = {
        "machine": describe(),
        "model": {k: v for k, v in vars(a).items() if k in OPTIONS[a.model]} | bases_and_bits,
        "spread": spreads,
        "bitsmoe_over_unquantized": ratios,
        "runs": runs,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
