"""`vllm serve` of a tiny BitsMoE checkpoint under a bounded load (benchmarks/serve_load.py): 64 concurrent
streaming completions and chats with malformed requests among them. Every well-formed request completes, every
malformed one gets its 4xx, and the server still answers afterwards."""

import pytest

from benchmarks.serve_load import run_load
from bitsmoe_vllm.local_server import FAST_AND_STRICT, vllm_server

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow  # starts `vllm serve`


def test_64_concurrent_streams_and_malformed_requests(tiny_model_dir, quantize_tiny, tmp_path):
    bitsmoe = quantize_tiny(
        tiny_model_dir("mixtral", layers=2, experts=16, intermediate=128), tmp_path / "bitsmoe", 2.5
    )
    with vllm_server(bitsmoe, *FAST_AND_STRICT, log=tmp_path / "server.log") as url:
        result = run_load(url, str(bitsmoe), requests=64, max_tokens=16)
    assert result["failed"] == 0, result["errors"]
    assert {name: r["status"] for name, r in result["malformed"].items()} == {
        name: r["expected"] for name, r in result["malformed"].items()
    }
    assert result["healthy_after"]
    assert (
        result["tokens_per_s"] > 0
        and 0 < result["latency_s"]["p50"] <= result["latency_s"]["p99"] < result["wall_s"] + 1
    )
