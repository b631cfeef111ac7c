"""`bitsmoe-demo-model`: a tiny random MoE checkpoint of a supported architecture, with a locally trained tokenizer.

Built from scratch, with no hub access: `build_tiny_model("mixtral", out_dir)` writes a Hugging Face checkpoint
(config, safetensors, tokenizer with a chat template) that transformers and vLLM load. The tests build theirs here too.
"""

import builtins
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ARCHITECTURES = (
    "qwen3_moe",
    "mixtral",
    "olmoe",
    "deepseek_v2",
    "glm4_moe",
    "deepseek_v3",
    "qwen3_next",
    "qwen3_5_moe",
    "granitemoe",
    "granitemoeshared",
    "granitemoehybrid",
    "gpt_oss",
)
HIDDEN, EXPERT_INTERMEDIATE, EXPERTS, TOP_K, LAYERS = 64, 64, 8, 2, 2
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def corpus() -> list[str]:
    """Docstrings of Python's builtins: real English-like text that exists on every machine."""
    return [obj.__doc__ for obj in vars(builtins).values() if isinstance(getattr(obj, "__doc__", None), str)]


def train_tokenizer(
    vocab_size: int = 384, texts: list[str] | None = None, chat_template: str | None = CHAT_TEMPLATE
) -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts` (default: corpus()): deterministic and offline."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus() if texts is None else texts, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[0], chat_template=chat_template
    )


def tiny_config(
    arch: str,
    vocab_size: int,
    eos_token_id: int,
    layers: int = LAYERS,
    experts: int = EXPERTS,
    intermediate: int = EXPERT_INTERMEDIATE,
    hidden: int = HIDDEN,
) -> transformers.PretrainedConfig:
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,  # head size 32: the smallest vLLM's CPU attention supports
        max_position_embeddings=512,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common,
            intermediate_size=128,
            moe_intermediate_size=intermediate,
            num_key_value_heads=1,
            head_dim=32,
            num_experts=experts,
            num_experts_per_tok=TOP_K,
            norm_topk_prob=True,
        )
    if arch == "mixtral":
        return transformers.MixtralConfig(
            **common,
            intermediate_size=intermediate,
            num_key_value_heads=2,
            num_local_experts=experts,
            num_experts_per_tok=TOP_K,
        )
    if arch == "olmoe":
        return transformers.OlmoeConfig(
            **common,
            intermediate_size=intermediate,
            num_key_value_heads=2,
            num_experts=experts,
            num_experts_per_tok=TOP_K,
        )
    # DeepSeek-V2/V3: layer 0 dense, the others MoE with a shared expert; vLLM's CPU MLA kernel is built for a latent
    # of kv_lora_rank 512 + rope 64 only
    deepseek = common | dict(
        intermediate_size=128,
        moe_intermediate_size=intermediate,
        num_key_value_heads=2,
        n_routed_experts=experts,
        n_shared_experts=1,
        num_experts_per_tok=TOP_K,
        first_k_dense_replace=1,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_rope_head_dim=64,
        n_group=1,
        topk_group=1,
    )
    if arch == "deepseek_v2":
        return transformers.DeepseekV2Config(
            **deepseek,
            qk_nope_head_dim=32,
            v_head_dim=32,
            topk_method="greedy",  # as DeepSeek-V2-Lite
            # as DeepSeek-V2 (V2-Lite's 1.0 leaves the routed experts so little of the output that the serving
            # tests could not tell their quantization from bf16's rounding)
            routed_scaling_factor=16.0,
        )
    # The later families with head_dim 64: vLLM's CPU kernels crash in bf16 on AMX machines on smaller odd heads.
    wide_heads = common | {"num_attention_heads": 2, "head_dim": 64}
    if arch == "glm4_moe":  # layer 0 dense, the others MoE with a shared expert and a score-correction bias
        return transformers.Glm4MoeConfig(
            **wide_heads,
            intermediate_size=128,
            moe_intermediate_size=intermediate,
            num_key_value_heads=1,
            n_routed_experts=experts,
            n_shared_experts=1,
            num_experts_per_tok=TOP_K,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
        )
    if arch == "deepseek_v3":  # as deepseek_v2, with the score-correction bias of its sigmoid router
        return transformers.DeepseekV3Config(
            **deepseek,
            qk_nope_head_dim=64,
            v_head_dim=64,
            topk_method="noaux_tc",  # as its config.json; vLLM reads it
        )
    if arch == "qwen3_next":  # hybrid: a linear-attention (gated delta net) layer, then a full-attention one
        return transformers.Qwen3NextConfig(
            **wide_heads,
            intermediate_size=128,
            moe_intermediate_size=intermediate,
            num_key_value_heads=1,
            num_experts=experts,
            num_experts_per_tok=TOP_K,
            shared_expert_intermediate_size=intermediate,
            layer_types=[("linear_attention", "full_attention")[i % 2] for i in range(layers)],
            norm_topk_prob=True,
        )
    if arch == "qwen3_5_moe":  # multimodal: Qwen3-Next's hybrid text model under model.language_model., a vision tower
        text = {k: v for k, v in common.items() if k != "tie_word_embeddings"} | dict(
            head_dim=64,
            num_key_value_heads=1,
            moe_intermediate_size=intermediate,
            shared_expert_intermediate_size=intermediate,
            num_experts=experts,
            num_experts_per_tok=TOP_K,
            layer_types=[("linear_attention", "full_attention")[i % 2] for i in range(layers)],
        )
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden)
        return transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
    # Granite's multipliers away from 1, so that a runtime that ignored one would show; heads x head_dim = H, as in
    # Granite's checkpoints (with 2 x 64 on H 64, vLLM and transformers were 0.66 apart on the same weights)
    granite = common | dict(
        intermediate_size=intermediate,
        num_key_value_heads=2,
        num_local_experts=experts,
        num_experts_per_tok=TOP_K,
        embedding_multiplier=4.0,
        residual_multiplier=0.5,
        attention_multiplier=1 / 32,
        logits_scaling=2.0,
    )
    if arch == "granitemoe":
        return transformers.GraniteMoeConfig(**granite)
    if arch == "granitemoeshared":
        return transformers.GraniteMoeSharedConfig(**granite, shared_intermediate_size=intermediate)
    if arch == "granitemoehybrid":  # a Mamba-2 layer, then an attention layer (no rotary embedding, as Granite 4.0)
        return transformers.GraniteMoeHybridConfig(
            **granite,
            shared_intermediate_size=intermediate,
            layer_types=[("mamba", "attention")[i % 2] for i in range(layers)],
            mamba_n_heads=2,
            mamba_d_head=hidden,  # n_heads x d_head = expand (2) x hidden
            mamba_d_state=16,
            mamba_n_groups=1,
            mamba_chunk_size=64,
        )
    if arch == "gpt_oss":  # a sliding-window layer, then a full one, as gpt-oss alternates them
        return transformers.GptOssConfig(
            **wide_heads,
            intermediate_size=intermediate,
            num_key_value_heads=2,  # one per tensor-parallel rank at least (vLLM's gpt-oss attention)
            num_local_experts=experts,
            num_experts_per_tok=TOP_K,
            sliding_window=128,
            layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(layers)],
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; known: {ARCHITECTURES}")


def build_tiny_model(arch: str, out_dir: Path, seed: int = 0, **shape) -> Path:
    """Write a random tiny `arch` checkpoint (float32) with its tokenizer to out_dir; return out_dir.

    `shape`: layers, experts, intermediate (per expert), hidden to override the defaults.
    """
    tokenizer = train_tokenizer()
    return write_random_model(
        tiny_config(arch, len(tokenizer), tokenizer.eos_token_id, **shape), tokenizer, out_dir, seed
    )


def write_random_model(
    config: transformers.PretrainedConfig, tokenizer, out_dir: Path, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """A model of `config` with random weights N(0, 1/fan-in), in `dtype`, saved with `tokenizer` to out_dir."""
    torch.manual_seed(seed)
    if isinstance(config, transformers.Qwen3_5MoeConfig):
        model = transformers.Qwen3_5MoeForConditionalGeneration._from_config(config, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # the default init is tiny (std 0.02); larger weights make quantization errors visible
        gpt_oss = isinstance(config, transformers.GptOssConfig)
        for name, p in model.named_parameters():
            if p.dim() > 1:  # gpt-oss stores its experts [E, in, out]
                p.normal_(0, p.shape[-2 if gpt_oss and name.endswith("_proj") else -1] ** -0.5)
            elif gpt_oss and name.endswith(("_bias", "sinks")):  # 0 at init: a runtime that dropped them would pass
                p.normal_(0, 0.5)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(
        prog="bitsmoe-demo-model",
        description="Write a tiny random MoE checkpoint to try bitsmoe-quantize and vllm serve on, and local text to "
        "calibrate it with. Random weights share no directions, so the quantizer takes the identity basis for it.",
    )
    p.add_argument("out", type=Path, help="directory to write the checkpoint to")
    p.add_argument("--arch", choices=ARCHITECTURES, default="qwen3_moe")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=128, help="each expert's intermediate size")
    p.add_argument("--hidden", type=int, default=HIDDEN)
    p.add_argument("--text", type=Path, help="also write English text (Python's docstrings) here, for --calib")
    a = p.parse_args()
    build_tiny_model(a.arch, a.out, layers=a.layers, experts=a.experts, intermediate=a.intermediate, hidden=a.hidden)
    if a.text:
        a.text.write_text("\n\n".join(corpus()))
    print(
        f"wrote a {a.layers}-layer {a.arch} with {a.experts} experts to {a.out}"
        + (f", text to {a.text}" if a.text else "")
    )


if __name__ == "__main__":
    main()
