"""The calibration walk (offline.calibrate.walk_layers): each layer's hidden states as transformers computes them, and
each MoE layer's experts replaced for the quantized walk."""

import pytest
import torch

from bitsmoe_vllm.offline.calibrate import embed, experts_output, read_texts, token_sequences, walk_layers
from bitsmoe_vllm.offline.demo import ARCHITECTURES
from bitsmoe_vllm.offline.modules import skeleton
from bitsmoe_vllm.offline.source import SourceCheckpoint
from tests.helpers import QUANT_SHAPE


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_walk_with_each_layers_experts_replaced_runs_the_replacement(arch, tiny_model_dir, calib_file):
    """The walk behind --feedback-inputs quantized: experts replaced by their own weights change nothing (so the
    replacement computes what the model's experts compute, routing weights included); halved weights change the
    layer after them and no layer before; the layer's own experts are freed before their replacement is built."""
    model = tiny_model_dir(arch, **QUANT_SHAPE)
    source, device = SourceCheckpoint(str(model)), torch.device("cpu")
    from transformers import AutoTokenizer

    tokens = token_sequences(AutoTokenizer.from_pretrained(model), read_texts([str(calib_file)]), 512, 64)
    net = skeleton(source, device)
    hidden, moe = embed(net, source, tokens, device), set(source.moe_layers())
    last = max(moe)

    def walk(replace=None) -> list[torch.Tensor]:
        return [h for _, h, _ in walk_layers(net, source, hidden, 0, moe, device, replace=replace)]

    plain = walk()
    seen, freed = [], []

    act = source.architecture.activation(source.config)

    def experts(weights: dict[str, torch.Tensor]):
        return lambda routed: experts_output(weights, routed, act)

    def replacement(i: int, routed):
        seen.append(i)
        freed.append(all(t.is_meta for t in source.architecture.experts(net.model.layers[i]).parameters()))
        return experts(source.expert_weights(i))

    same = walk(replacement)
    assert seen == sorted(moe)
    assert all(freed), "a layer's own experts were still in memory beside their replacement"
    for a, b in zip(plain, same):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    halved = walk(
        lambda i, routed: experts(
            {p: w / 2 for p, w in source.expert_weights(i).items()} if i == last else source.expert_weights(i)
        )
    )
    assert all(torch.equal(same[i], halved[i]) for i in range(last)), "a layer before the replaced one changed"
    assert (halved[last] - plain[last]).norm() > 0.01 * plain[last].norm()


@pytest.mark.parametrize("arch", ["gpt_oss", "qwen3_moe", "deepseek_v3"])
def test_the_walk_gives_transformers_hidden_states_past_a_sliding_window(arch, tiny_model_dir, calib_file):
    """Sequences of 256 tokens, twice gpt-oss's window of 128: each layer gets the mask of its own type, as the
    model's forward gives it (a full-attention layer given the sliding window differs past token 128)."""
    import transformers

    model = tiny_model_dir(arch, **QUANT_SHAPE)
    source, device = SourceCheckpoint(str(model)), torch.device("cpu")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    tokens = token_sequences(tokenizer, read_texts([str(calib_file)]), 512, 256)
    net = skeleton(source, device)
    walked = [h for _, h, _ in walk_layers(net, source, embed(net, source, tokens, device), 0, set(), device)]
    full = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        expected = full(tokens, output_hidden_states=True).hidden_states  # the embeddings, then each layer's output
    for i, h in enumerate(walked[:-1]):  # (the last one transformers gives after the final norm)
        torch.testing.assert_close(h, expected[i + 1], rtol=1e-4, atol=1e-4 * float(expected[i + 1].abs().max()))
