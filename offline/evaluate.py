"""`bitsmoe-eval ppl`: perplexity of an original or a BitsMoE checkpoint (the latter through the reference
forward), with both protocols in use: non-overlapping windows, and a sliding window of stride 512."""

import argparse
import json
import math
import sys

import torch
import transformers
from tqdm import tqdm

from bitsmoe_vllm.checkpoint import TensorFiles, load_layer, read_quant_config
from bitsmoe_vllm.reference import MoELayer, expert_factors, moe_forward

from .calibrate import read_texts, token_stream
from .modules import load_module, skeleton
from .source import SourceCheckpoint, resolve_model_dir


class ReferenceExperts(torch.nn.Module):
    """Stands in for a transformers experts module: same call, BitsMoE reference forward."""

    def __init__(self, layer: MoELayer):
        super().__init__()
        self.layer = layer
        self.dequantized = expert_factors(layer)  # once, not at every forward

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return moe_forward(hidden_states, top_k_weights, top_k_index, self.layer, self.dequantized)


def load_model(model: str, device: torch.device) -> transformers.PreTrainedModel:
    """The causal LM of a checkpoint, float32; a BitsMoE checkpoint's experts run the reference forward."""
    source = SourceCheckpoint(model)
    net = skeleton(source, device)
    bitsmoe = source.file_config.get("quantization_config", {}).get("quant_method") == "bitsmoe"
    cfg = read_quant_config(source.dir) if bitsmoe else None  # (fp8 block-quantized weights: SourceCheckpoint.get)
    quantized = {layout.module for layout in cfg.layers} if cfg else set()
    files = TensorFiles(source.dir) if cfg else None
    for i, layer in enumerate(net.model.layers):
        module = source.architecture.experts_module.format(layer=i)
        if module in quantized:
            moe = getattr(layer, source.architecture.moe_block)
            moe.experts = ReferenceExperts(load_layer(files, cfg, module).to(device))
        load_module(layer, f"model.layers.{i}.", source, device)
    for prefix, part in (
        ("model.embed_tokens.", net.model.embed_tokens),
        ("model.norm.", net.model.norm),
        ("lm_head.", net.lm_head),
    ):
        load_module(part, prefix, source, device)
    return net.eval()


def perplexity(model, tokens: torch.Tensor, seq_len: int, stride: int | None) -> float:
    """exp(mean NLL) over tokens [n]. stride None: non-overlapping windows of seq_len, each scoring its
    tokens after the first; else sliding windows advanced by stride, each scoring only its new tokens."""
    n = len(tokens)
    if n < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {n}")
    if stride is not None and not 0 < stride <= seq_len:
        raise ValueError(f"the sliding-window stride {stride} must be between 1 and the window length {seq_len}")
    nll, count, prev_end = 0.0, 0, 0
    step = stride or seq_len
    for begin in tqdm(
        range(0, n, step), desc=f"ppl ({'stride ' + str(stride) if stride else 'windows'})", unit="window"
    ):
        end = min(begin + seq_len, n)
        window = tokens[begin:end][None].to(model.device)
        new = end - prev_end if stride else end - begin
        with torch.no_grad():
            logits = model(window).logits[0, :-1].float()
        targets = window[0, 1:]
        losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        scored = losses[-min(new, len(losses)) :]
        nll, count = nll + float(scored.sum()), count + len(scored)
        prev_end = end
        if end == n:
            break
    return math.exp(nll / count)


def text_tokens(model_dir, text_files: list[str], max_tokens: int | None) -> torch.Tensor:
    stream = token_stream(transformers.AutoTokenizer.from_pretrained(model_dir), read_texts(text_files))
    return torch.tensor(stream[:max_tokens] if max_tokens else stream)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bitsmoe-eval", description="Evaluate an original or a BitsMoE checkpoint.")
    sub = p.add_subparsers(dest="command", required=True)
    ppl = sub.add_parser("ppl", help="perplexity on local text, both protocols")
    ppl.add_argument("--model", required=True)
    ppl.add_argument(
        "--text", required=True, nargs="+", metavar="FILE", help=".txt, .jsonl ('text') or .parquet ('text')"
    )
    ppl.add_argument("--seq-len", type=int, default=2048)
    ppl.add_argument("--stride", type=int, default=512, help="stride of the sliding-window protocol (default 512)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the text")
    ppl.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    a = p.parse_args(argv)
    try:
        model_dir = resolve_model_dir(a.model)
        model = load_model(str(model_dir), torch.device(a.device))
        tokens = text_tokens(model_dir, a.text, a.max_tokens)
        result = {
            "model": a.model,
            "tokens": len(tokens),
            "seq_len": a.seq_len,
            "non_overlapping": perplexity(model, tokens, a.seq_len, None),
            "sliding": {"stride": a.stride, "ppl": perplexity(model, tokens, a.seq_len, a.stride)},
        }
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"bitsmoe-eval: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0
