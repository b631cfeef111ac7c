"""A Qwen3-MoE language model trained from scratch on real English text, in the regime of the shared basis: many
wide experts (E * I / H = 16), so the experts of a layer hold far more rows than the hidden size.

Text: benchmarks/corpus.py's training corpus (State of the Union addresses, Moby Dick, the King James Bible,
Wikipedia summaries), split by whole documents; the model sees only the training split. A byte-level BPE
tokenizer is trained on the training split. Training is deterministic (fixed seeds, a fixed order of the
windows, float32) and resumable: WORK/checkpoint.safetensors is written atomically every --save-every steps, and
the same command continues from it. At the end the weights are written as bf16 safetensors to OUT with the
tokenizer, and OUT/training.json holds the perplexity on the evaluation split and the routing balance per layer.

    python -m benchmarks.train_moe [--out benchmarks/models/trained-moe] [--work benchmarks/work/train_moe]
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from benchmarks import machine
from benchmarks.corpus import write_splits
from bitsmoe_vllm.offline.calibrate import read_texts, token_stream
from bitsmoe_vllm.offline.demo import train_tokenizer
from bitsmoe_vllm.offline.evaluate import perplexity
from bitsmoe_vllm.offline.rundir import save_tensors

ROOT = Path(__file__).resolve().parent.parent
SEQ_LEN, BATCH = 1024, 8  # 8,192 tokens a step; 1024 so the sliding-window protocol (1024, stride 512) applies
MODEL = dict(
    vocab_size=8192,
    hidden_size=256,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_experts=32,
    num_experts_per_tok=4,
    norm_topk_prob=True,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
    router_aux_loss_coef=0.02,  # of balance_loss
    output_router_logits=True,
)


def prepare(work: Path) -> tuple[transformers.PreTrainedTokenizerFast, torch.Tensor, dict[str, Path]]:
    """Text splits, tokenizer and the training windows [N, SEQ_LEN + 1], each made once and kept in WORK."""
    splits = {part: work / "text" / f"{part}.jsonl" for part in ("train", "calib", "eval")}
    if not all(p.is_file() for p in splits.values()):
        write_splits(work / "text", mixed=True)
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        texts = read_texts([str(splits["train"])])
        train_tokenizer(MODEL["vocab_size"], texts, chat_template=None).save_pretrained(tok_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
    windows_file = work / "train_windows.safetensors"
    if not windows_file.is_file():
        stream = torch.tensor(token_stream(tokenizer, read_texts([str(splits["train"])])), dtype=torch.int32)
        n = (len(stream) - 1) // SEQ_LEN
        # each window holds SEQ_LEN + 1 tokens: its inputs and, shifted by one, its targets
        windows = torch.stack([stream[i * SEQ_LEN : (i + 1) * SEQ_LEN + 1] for i in range(n)])
        save_tensors(windows_file, {"windows": windows})
    return tokenizer, load_file(windows_file)["windows"], splits


def batch_order(n_windows: int, steps: int, seed: int) -> torch.Tensor:
    """[steps, BATCH] window indices: a fresh permutation every epoch, fixed by the seed."""
    g = torch.Generator().manual_seed(seed)
    epochs = -(-steps * BATCH // n_windows)
    order = torch.cat([torch.randperm(n_windows, generator=g) for _ in range(epochs)])
    return order[: steps * BATCH].reshape(steps, BATCH)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def balance_loss(router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over the layers of E * sum_i f_i P_i (f_i: the share of the layer's routed slots expert i receives, P_i:
    its mean router probability); 1 when every layer is balanced. Per layer: transformers' loss pools the layers'
    tokens, which lets an expert die in one layer while another layer's copy of it is busy."""
    losses = []
    for logits in router_logits:  # [N, E]
        probs = logits.float().softmax(-1)
        chosen = probs.topk(MODEL["num_experts_per_tok"], -1).indices
        share = torch.zeros_like(probs).scatter_(1, chosen, 1.0).mean(0) / MODEL["num_experts_per_tok"]  # [E]
        losses.append(MODEL["num_experts"] * (share * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def save_checkpoint(path: Path, model, optimizer, step: int) -> None:
    """Model and optimizer state as safetensors (nothing pickled), written atomically."""
    state = optimizer.state_dict()
    # lm_head.weight is the embeddings' tensor (tied): safetensors stores a tensor once
    tensors = {f"model.{k}": v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tensors |= {f"optimizer.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}
    save_tensors(path, tensors, {"step": str(step), "param_groups": json.dumps(state["param_groups"])})


def load_checkpoint(path: Path, model, optimizer) -> int:
    """The step a checkpoint was saved at, with its state loaded into model and optimizer."""
    with safe_open(path, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing != ["lm_head.weight"] or unexpected:
        raise ValueError(f"{path}: not a checkpoint of this model (missing {missing}, unexpected {unexpected})")
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optimizer."):
            _, i, key = k.split(".", 2)
            state.setdefault(int(i), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return int(meta["step"])


@torch.no_grad()
def routing_balance(model, tokens: torch.Tensor) -> list[dict]:
    """Per MoE layer, the share of routed slots each expert receives over `tokens` [n] (uniform: 1 / E)."""
    counts = [torch.zeros(MODEL["num_experts"]) for _ in model.model.layers]
    hooks = []
    for i, layer in enumerate(model.model.layers):

        def record(_m, args, i=i):
            counts[i] += torch.bincount(args[1].flatten(), minlength=MODEL["num_experts"]).float()

        hooks.append(layer.mlp.experts.register_forward_pre_hook(record))
    for w in tokens.split(SEQ_LEN):
        model(w[None])
    for h in hooks:
        h.remove()
    out = []
    for c in counts:
        share = c / c.sum()
        out.append(
            {
                "max_over_mean": float(share.max() * len(share)),
                "min_over_mean": float(share.min() * len(share)),
                "normalised_entropy": float(-(share * share.clamp_min(1e-12).log()).sum() / math.log(len(share))),
            }
        )
    return out


def evaluate(model, tokenizer, splits: dict[str, Path]) -> dict:
    tokens = torch.tensor(token_stream(tokenizer, read_texts([str(splits["eval"])])))
    model.eval()
    return {
        "eval_tokens": len(tokens),
        "ppl_windows_512": perplexity(model, tokens, 512, None),
        "ppl_stride_1024_512": perplexity(model, tokens, 1024, 512),
        "routing": routing_balance(model, tokens[: 64 * SEQ_LEN]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "models" / "trained-moe")
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "train_moe")
    p.add_argument(
        "--steps", type=int, default=600, help="optimizer steps of 8,192 tokens (default 600: about an hour on 2 cores)"
    )
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    tokenizer, windows, splits = prepare(a.work)
    config = transformers.Qwen3MoeConfig(
        **MODEL,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(a.seed)
    model = transformers.Qwen3MoeForCausalLM(config)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95)
    )
    checkpoint, log = a.work / "checkpoint.safetensors", a.work / "train.log"
    start = 0
    if checkpoint.is_file():
        start = load_checkpoint(checkpoint, model, optimizer)
        print(f"resuming at step {start} of {a.steps}", flush=True)
        with log.open("a") as f:
            f.write(f"resumed at step {start}\n")
    order = batch_order(len(windows), a.steps, a.seed)
    print(
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {len(windows)} training windows of "
        f"{SEQ_LEN} "
        f"tokens ({len(windows) * SEQ_LEN / 1e6:.2f} M tokens), {a.steps} steps of {BATCH * SEQ_LEN} tokens",
        flush=True,
    )
    model.train()
    t0 = time.time()
    for step in range(start, a.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, a.steps, a.lr, a.warmup)
        batch = windows[order[step]].long()
        out = model(input_ids=batch[:, :-1])
        lm_loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten())
        aux = balance_loss(out.router_logits)
        (lm_loss + MODEL["router_aux_loss_coef"] * aux).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        line = (
            f"step {step + 1} loss {float(lm_loss):.4f} balance {float(aux):.4f} grad {float(grad_norm):.3f} "
            f"lr {group['lr']:.2e} {BATCH * SEQ_LEN * (step + 1 - start) / (time.time() - t0):.0f} tok/s"
        )
        print(line, flush=True)
        with log.open("a") as f:
            f.write(line + "\n")
        if (step + 1) % a.save_every == 0 or step + 1 == a.steps:
            save_checkpoint(checkpoint, model, optimizer, step + 1)
    model.to(torch.bfloat16)
    model.config.output_router_logits = False
    result = {
        "config": MODEL,
        "steps": a.steps,
        "tokens_seen": a.steps * BATCH * SEQ_LEN,
        "seq_len": SEQ_LEN,
        "train_windows": len(windows),
        "machine": machine.describe(),
    }
    result |= evaluate(model.float(), tokenizer, splits)  # the bf16 weights, evaluated in float32
    tmp = a.out.with_name(a.out.name + ".partial")
    model.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(result, indent=2) + "\n")
    if a.out.exists():
        raise FileExistsError(f"{a.out} exists; the weights are committed once: move it away to write them again")
    os.replace(tmp, a.out)
    print(json.dumps({k: v for k, v in result.items() if k != "routing"}, indent=2))


if __name__ == "__main__":
    main()
