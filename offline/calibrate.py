"""Calibration: local text to token sequences, and the layer-by-layer walk that records what each
MoE layer's experts receive (inputs, routing) while the hidden states move through the original model, or through
the model whose experts are replaced layer by layer as they are quantized.
"""

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import transformers
from tqdm import tqdm
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from bitsmoe_vllm.activation import SILU, Activation

from .modules import load_module, release


def read_texts(paths: list[str]) -> list[str]:
    """Documents from .txt (one per file), .jsonl (field "text" per line) or .parquet (column "text")."""
    texts = []
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise FileNotFoundError(f"calibration file {path} not found")
        if path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise ValueError(f"{path} line {n}: expected a JSON object with a string field 'text'")
                    texts.append(record["text"])
        elif path.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
            table = pq.read_table(path)
            if "text" not in table.column_names:
                raise ValueError(f"{path}: no 'text' column (found {table.column_names})")
            texts.extend(str(t) for t in table.column("text").to_pylist() if t)
        else:
            texts.append(path.read_text(encoding="utf-8"))
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"calibration files {paths} hold no text")
    return texts


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """The documents' tokens, each document followed by EOS (when the tokenizer has one)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"] + eos]


def token_sequences(tokenizer, texts: list[str], n_tokens: int, seq_len: int, held_out: int = 0) -> torch.Tensor:
    """[S + held_out, seq_len] token ids, S = ceil(n_tokens / seq_len), taken evenly from token_stream(texts)."""
    stream = token_stream(tokenizer, texts)
    S = -(-n_tokens // seq_len)
    available = len(stream) // seq_len
    if available < S + held_out:
        also = f" and {held_out} held out to check the result" if held_out else ""
        raise ValueError(
            f"the calibration text gives {len(stream)} tokens ({available} sequences of {seq_len}), fewer than "
            f"--calib-tokens {n_tokens} needs ({S} sequences{also}); pass more text or lower --calib-tokens / "
            "--calib-seq-len"
        )
    starts = torch.linspace(0, available - 1, S + held_out).round().long() * seq_len
    stream = torch.tensor(stream, dtype=torch.long)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


@dataclass
class Routed:
    """What one MoE layer's experts received for every calibration token."""

    x: torch.Tensor  # [N, H] expert input
    ids: torch.Tensor  # [N, K] selected experts
    weights: torch.Tensor  # [N, K] routing weights


def with_biases(
    weights: dict[str, torch.Tensor], e: int, h_gate: torch.Tensor, h_up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e's gate and up products [n, I] plus its biases where the family has them (weights' "gate_bias",
    "up_bias": offline.source.SourceCheckpoint.expert_weights)."""
    if "gate_bias" not in weights:
        return h_gate, h_up
    return h_gate + weights["gate_bias"][e], h_up + weights["up_bias"][e]


def pre_activations(weights: dict[str, torch.Tensor], e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e's gate and up pre-activations [n, I] on inputs x [n, H], biases included (in float32, whatever
    the weights' dtype: offline.source.EXACT_DTYPES)."""
    return with_biases(weights, e, x @ weights["gate"][e].float().T, x @ weights["up"][e].float().T)


class ByExpert:
    """A layer's routed tokens on the weights' device in float32, grouped by expert, with what the cost model and the
    error feedback read on every pass (each kind of basis, projection and batch of experts) computed once: the
    inputs in a shared basis (x V^T, [N, R]) and each expert's gate and up pre-activations (pre_activations; all
    experts' in one [2, N K, I] float32 tensor, 88 MB for Qwen3-30B-A3B's layer on 1,792 tokens: kept as a tensor
    per expert, they fragmented the heap by 1.5 GB). Each is computed as the passes computed it before, so the
    results are the same bytes. The pre-activations are kept only within PRE_BYTES (Qwen3-30B-A3B's on 16,384
    tokens are 805 MB), and not with keep_pre=False: for a single pass, which reads each expert's once."""

    PRE_BYTES = 1 << 28

    def __init__(self, routed: Routed, weights: dict[str, torch.Tensor], keep_pre: bool = True):
        device = weights["gate"].device
        self.x, self.ids = routed.x.to(device).float(), routed.ids.to(device)
        self.expert_weights, self.routing = weights, routed.weights.to(device).float()
        self.experts = self.ids.unique().tolist()
        # each expert's (token, slot) pairs in the row-major order of (ids == e).nonzero()
        flat = self.ids.flatten()
        order = flat.argsort(stable=True)
        self._token, self._slot = order // self.ids.shape[1], order % self.ids.shape[1]
        ends = torch.bincount(flat, minlength=max(self.experts, default=0) + 1).cumsum(0).tolist()
        self._span = {e: (ends[e - 1] if e else 0, ends[e]) for e in self.experts}
        I = weights["gate"].shape[1]
        keep_pre = keep_pre and 2 * len(flat) * I * 4 <= self.PRE_BYTES
        self._pre = torch.empty(2, len(flat), I, device=device) if keep_pre else None
        self._computed, self._projected = set(), []

    def tokens(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's tokens (rows of x) and the slots that chose it."""
        start, stop = self._span[e]
        return self._token[start:stop], self._slot[start:stop]

    def z(self, basis: torch.Tensor | None) -> torch.Tensor:
        """[N, R]: every token's input in `basis` [R, H] (None: the identity, x itself)."""
        if basis is None:
            return self.x
        for b, z in self._projected:  # by identity: the entry holds the basis, so no other tensor takes its id
            if b is basis:
                return z
        self._projected.append((basis, self.x @ basis.T))
        return self._projected[-1][1]

    def pre(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's gate and up pre-activations on its tokens [n, I] each."""
        start, stop = self._span[e]
        if e in self._computed:
            return self._pre[0, start:stop], self._pre[1, start:stop]
        pre = pre_activations(self.expert_weights, e, self.x[self.tokens(e)[0]])
        if self._pre is not None:
            self._pre[0, start:stop], self._pre[1, start:stop] = pre
            self._computed.add(e)
        return pre


def by_expert(routed: "Routed | ByExpert", weights: dict[str, torch.Tensor]) -> ByExpert:
    """routed as a ByExpert (one call's: nothing kept for others); a ByExpert given must be of these weights."""
    if isinstance(routed, ByExpert):
        if routed.expert_weights is not weights:
            raise ValueError("a ByExpert computes pre-activations from its own expert weights: pass the same dict")
        return routed
    return ByExpert(routed, weights, keep_pre=False)


def experts_output(weights: dict[str, torch.Tensor], routed: Routed, act: Activation = SILU) -> torch.Tensor:
    """The experts' output [N, H] float32: weights[p] [E, I, H] (down as D_e^T), gated by `act`, routing-weighted."""
    x, ids, w = routed.x.float(), routed.ids, routed.weights.float()
    y = torch.zeros_like(x)
    for e in ids.unique().tolist():
        token, slot = (ids == e).nonzero(as_tuple=True)
        out = act(*pre_activations(weights, e, x[token])) @ weights["down"][e].float()  # [n, H]
        if "down_bias" in weights:
            out += weights["down_bias"][e]
        y.index_add_(0, token, w[token, slot, None] * out)
    return y


def walk_layers(
    model: transformers.PreTrainedModel,
    source,
    hidden: torch.Tensor,
    first_layer: int,
    moe_layers: set[int],
    device: torch.device,
    batch: int = 8,
    replace: Callable[[int, Routed], Callable[[Routed], torch.Tensor]] | None = None,
    desc: str = "calibrate",
) -> Iterator[tuple[int, torch.Tensor, Routed | None]]:
    """From hidden states [S, L, H] entering `first_layer`, yield (layer, hidden after it, Routed or None).

    An MoE layer's experts run as experts_output of their weights in the checkpoint's dtype (SourceCheckpoint.
    expert_weights: a float32 copy of a big layer's experts in the model's module would be GBs more).
    replace(layer, routed) -> a function of the tokens routed to the layer's experts (a Routed) giving the experts'
    output [N, H] (experts_output of other weights, the quantized layer's forward): each MoE layer runs a second time
    with its experts so replaced, so that the hidden states after it, and what later layers' experts receive, are
    those of the model whose earlier layers were replaced.
    One decoder layer's weights are in memory at a time.
    """
    positions = torch.arange(hidden.shape[1], device=device)[None]  # [1, L]
    rotary = model.model.rotary_emb
    position_embeddings = None if rotary is None else rotary(hidden[:1].to(device), positions)
    layers = model.model.layers

    def make_mask(i: int):
        """Layer i's mask function, as the model's forward chooses it: by the layer's type where the config lists
        them (gpt-oss alternates sliding-window and full attention), else a sliding window wherever one is set."""
        layer_types = getattr(model.config, "layer_types", None)
        if layer_types is not None:
            sliding = layer_types[i] == "sliding_attention"
        else:
            sliding = getattr(model.config, "sliding_window", None) is not None
        return create_sliding_window_causal_mask if sliding else create_causal_mask

    def forward(i: int, layer: torch.nn.Module) -> torch.Tensor:
        out = torch.empty_like(hidden)
        with torch.no_grad():
            for s in range(0, hidden.shape[0], batch):
                chunk = hidden[s : s + batch].to(device)
                mask = make_mask(i)(
                    config=model.config,
                    inputs_embeds=chunk,
                    attention_mask=None,
                    past_key_values=None,
                    position_ids=positions,
                )
                out[s : s + batch] = layer(
                    chunk, attention_mask=mask, position_ids=positions, position_embeddings=position_embeddings
                ).cpu()
        return out

    def forward_with(i: int, layer: torch.nn.Module, experts: torch.nn.Module, run) -> torch.Tensor:
        """forward(i, layer) with the experts' output computed by run(Routed) -> [N, H]."""
        experts.forward = lambda x, ids, w: run(Routed(x, ids, w)).to(x.dtype)
        try:
            return forward(i, layer)
        finally:
            del experts.forward  # and with it `run` and what it holds

    act = source.architecture.activation(source.config)
    for i in tqdm(range(first_layer, len(layers)), desc=desc, unit="layer", initial=first_layer, total=len(layers)):
        experts = source.architecture.experts(layers[i]) if i in moe_layers else None
        layer = load_module(layers[i], f"model.layers.{i}.", source, device, skip=experts)
        if experts is None:
            source.tensors.close()  # its weights are copied: the maps' pages would count in the RSS besides them
            hidden = forward(i, layer)
            release(layer)
            yield i, hidden, None
            continue
        weights = {p: w.to(device) for p, w in source.expert_weights(i).items()}
        source.tensors.close()
        captured: list[tuple] = []
        hook = experts.register_forward_pre_hook(lambda _m, args, c=captured: c.append(args[:3]))
        out = forward_with(i, layer, experts, partial(experts_output, weights, act=act))
        hook.remove()
        del weights  # before a replacement is built: one layer's experts in memory, not two
        routed = Routed(*(torch.cat([c[k].reshape(-1, c[k].shape[-1]) for c in captured]) for k in range(3)))
        del captured  # the batches' inputs, now copied into routed
        if replace is not None:
            out = forward_with(i, layer, experts, replace(i, routed))
        release(layer)
        hidden = out
        yield i, hidden, routed


def embed(model: transformers.PreTrainedModel, source, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Hidden states [S, L, H] (float32, on the CPU) entering layer 0."""
    embedding = load_module(model.model.embed_tokens, "model.embed_tokens.", source, device)
    with torch.no_grad():
        hidden = embedding(tokens.to(device)).float().cpu()
    release(embedding)
    return hidden
