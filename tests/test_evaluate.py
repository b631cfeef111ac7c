"""bitsmoe-eval ppl: the two perplexity protocols and loading original and BitsMoE checkpoints."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import transformers

from bitsmoe_vllm.offline.dequantize import dequantize_checkpoint
from bitsmoe_vllm.offline.evaluate import ReferenceExperts, load_model, main, perplexity
from tests.helpers import QUANT_SHAPE


class Uniform(torch.nn.Module):
    """Logits 0 everywhere: every token has probability 1/vocab."""

    device = torch.device("cpu")

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return SimpleNamespace(logits=torch.zeros(*ids.shape, self.vocab))


@pytest.mark.parametrize("stride", [None, 1, 7, 32])
def test_uniform_model_has_perplexity_vocab(stride):
    assert perplexity(Uniform(50), torch.randint(0, 50, (101,)), seq_len=32, stride=stride) == pytest.approx(50)


def test_stride_longer_than_the_window_is_refused():
    with pytest.raises(ValueError, match="stride 512 must be between 1 and the window length 256"):
        perplexity(Uniform(5), torch.zeros(300, dtype=torch.long), seq_len=256, stride=512)


def test_protocols_against_transformers_loss(tiny_model_dir):
    model_dir = tiny_model_dir("olmoe")
    model = load_model(str(model_dir), torch.device("cpu"))
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokens = torch.randint(0, 300, (90,))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens[None]).logits, reference(tokens[None]).logits)
        whole = math.exp(float(reference(tokens[None], labels=tokens[None]).loss))
        windows = [math.exp(float(reference(w[None], labels=w[None]).loss)) for w in tokens.split(45)]
    assert perplexity(model, tokens, seq_len=90, stride=None) == pytest.approx(whole, rel=1e-5)
    assert perplexity(model, tokens, seq_len=45, stride=None) == pytest.approx(
        math.sqrt(windows[0] * windows[1]), rel=1e-5
    )
    assert perplexity(model, tokens, seq_len=45, stride=45) == pytest.approx(
        perplexity(model, tokens, 45, None), rel=1e-9
    )
    assert perplexity(model, tokens, seq_len=200, stride=10) == pytest.approx(whole, rel=1e-5)


def test_bitsmoe_checkpoint_runs_the_reference(tiny_model_dir, quantize_tiny, calib_file, tmp_path, capsys):
    model_dir = tiny_model_dir("mixtral", **QUANT_SHAPE)
    out = quantize_tiny(model_dir, tmp_path / "q", 3.0)
    model = load_model(str(out), torch.device("cpu"))
    assert all(isinstance(layer.mlp.experts, ReferenceExperts) for layer in model.model.layers)
    args = ["--text", str(calib_file), "--seq-len", "128", "--stride", "64", "--max-tokens", "600"]
    assert main(["ppl", "--model", str(out), *args]) == 0
    quantized = json.loads(capsys.readouterr().out)
    assert main(["ppl", "--model", str(model_dir), *args]) == 0
    original = json.loads(capsys.readouterr().out)
    assert quantized["tokens"] == original["tokens"] == 600 and quantized["sliding"]["stride"] == 64
    for result in (quantized, original):
        assert 1 < result["non_overlapping"] < 1e4 and 1 < result["sliding"]["ppl"] < 1e4
    assert quantized["non_overlapping"] != original["non_overlapping"]


def test_dequantized_checkpoint_is_the_bitsmoe_model_one_shard_per_layer(tiny_model_dir, quantize_tiny, tmp_path):
    out = quantize_tiny(tiny_model_dir("qwen3_moe", **QUANT_SHAPE), tmp_path / "q", 2.5)
    plain = dequantize_checkpoint(out, tmp_path / "plain")
    index = json.loads((plain / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == QUANT_SHAPE["layers"] + 1 == len(list(plain.glob("*.safetensors")))
    assert "quantization_config" not in json.loads((plain / "config.json").read_text())
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_model(str(out), torch.device("cpu"))(ids).logits
        served = transformers.AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(served, expected, rtol=1e-4, atol=1e-4)
