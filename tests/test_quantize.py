"""bitsmoe-quantize end to end on every tiny architecture."""

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bitsmoe_vllm.checkpoint import TensorFiles, load_layer, read_quant_config
from bitsmoe_vllm.format import PROJECTIONS
from bitsmoe_vllm.offline.calibrate import embed, read_texts, token_sequences, walk_layers
from bitsmoe_vllm.offline.demo import ARCHITECTURES
from bitsmoe_vllm.offline.modules import load_module, skeleton
from bitsmoe_vllm.offline.source import SourceCheckpoint
from bitsmoe_vllm.reference import moe_forward
from tests.helpers import QUANT_SHAPE

BUDGETS = (2.0, 2.5, 3.0)


@pytest.fixture(scope="module")
def quantized(tiny_model_dir, quantize_tiny, tmp_path_factory):
    """arch -> (model dir, {bits: BitsMoE checkpoint dir})."""
    done = {}

    def get(arch):
        if arch not in done:
            model = tiny_model_dir(arch, **QUANT_SHAPE)
            out = tmp_path_factory.mktemp(f"{arch}-q")
            done[arch] = model, {b: quantize_tiny(model, out / f"{b}", b, calib_tokens=2048) for b in BUDGETS}
        return done[arch]

    return get


def expert_bits_on_disk(directory) -> tuple[int, int]:
    """(bits of every BitsMoE tensor in the safetensors files, original routed-expert weights)."""
    cfg = read_quant_config(directory)
    modules = tuple(layer.module + "." for layer in cfg.layers)
    stored = 0
    for shard in directory.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            stored += sum(8 * f.get_tensor(n).nbytes for n in f.keys() if n.startswith(modules))
    return stored, len(cfg.layers) * 3 * cfg.num_experts * cfg.intermediate_size * cfg.hidden_size


def layer_errors(model_dir, checkpoint, calib_file) -> dict[int, float]:
    """MoE layer -> mean squared output error per calibration token, quantized vs original experts."""
    source, device = SourceCheckpoint(str(model_dir)), torch.device("cpu")
    from transformers import AutoTokenizer

    tokens = token_sequences(AutoTokenizer.from_pretrained(model_dir), read_texts([str(calib_file)]), 2048, 128)
    net = skeleton(source, device)
    cfg, files = read_quant_config(checkpoint), TensorFiles(checkpoint)
    errors = {}
    for i, _, routed in walk_layers(
        net, source, embed(net, source, tokens, device), 0, set(source.moe_layers()), device
    ):
        if routed is None:
            continue
        arch = source.architecture
        experts = load_module(
            arch.experts(skeleton(source, device).model.layers[i]),
            f"model.layers.{i}.{arch.moe_block}.experts.",
            source,
            device,
        )
        with torch.no_grad():
            original = experts(routed.x, routed.ids, routed.weights)
        layer = load_layer(files, cfg, source.architecture.experts_module.format(layer=i))
        errors[i] = float(((moe_forward(routed.x, routed.weights, routed.ids, layer) - original) ** 2).sum(-1).mean())
    return errors


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])  # experts stored one by one; stacked, with biases
def test_a_bfloat16_checkpoint_quantizes_as_its_values_in_float32(arch, tiny_model_dir, quantize_tiny, tmp_path):
    """The experts stay in the checkpoint's bf16 (half the memory of float32) and every use converts them: the
    result is, byte for byte, that of the same values stored in float32, and so are the costs (the allocation's
    estimated loss: a cost computed in bf16 would change it, not always the codes)."""
    model = tiny_model_dir(arch, **QUANT_SHAPE)
    experts, loss = {}, {}
    for dtype in (torch.bfloat16, torch.float32):
        source = tmp_path / f"{arch}-{str(dtype)[6:]}"
        shutil.copytree(model, source)
        for shard in source.glob("*.safetensors"):
            tensors = load_file(shard)
            save_file({n: t.bfloat16().to(dtype) if t.is_floating_point() else t for n, t in tensors.items()}, shard)
        checkpoint = SourceCheckpoint(str(source))
        assert checkpoint.expert_weights(checkpoint.moe_layers()[0])["gate"].dtype == dtype
        out = quantize_tiny(source, tmp_path / f"out-{dtype}", 2.5, calib_tokens=2048)
        modules = tuple(layer.module + "." for layer in read_quant_config(out).layers)
        files = TensorFiles(out)
        experts[dtype] = {n: files[n] for n in files if n.startswith(modules)}
        loss[dtype] = json.loads((out / "quantization_report.json").read_text())["allocation"]["loss"]
    assert loss[torch.bfloat16] == loss[torch.float32]
    assert experts[torch.bfloat16].keys() == experts[torch.float32].keys()
    assert all(torch.equal(t, experts[torch.float32][n]) for n, t in experts[torch.bfloat16].items())


def spearman(a: list[float], b: list[float]) -> float:
    ranks = [torch.tensor(x).argsort().argsort().double() for x in (a, b)]
    ra, rb = (r - r.mean() for r in ranks)
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_stored_bits_never_exceed_the_budget(arch, quantized):
    _, checkpoints = quantized(arch)
    for budget, directory in checkpoints.items():
        stored, weights = expert_bits_on_disk(directory)
        cfg = read_quant_config(directory)
        assert stored / weights <= budget
        assert stored / weights == pytest.approx(cfg.achieved_bits["all"], abs=1e-9)
        assert budget - 0.05 < stored / weights  # the allocation uses the budget


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_error_falls_as_bits_rise_and_the_cost_model_ranks_it(arch, quantized, calib_file):
    model, checkpoints = quantized(arch)
    estimated, measured, total = [], [], {}
    for budget, directory in checkpoints.items():
        errors = layer_errors(model, directory, calib_file)
        report = json.loads((directory / "quantization_report.json").read_text())
        for layer, layout in zip(sorted(errors), read_quant_config(directory).layers):
            estimated.append(sum(report["layers"][layout.module][p]["estimated_loss"] for p in PROJECTIONS))
            measured.append(errors[layer])
        total[budget] = sum(errors.values())
    assert total[2.0] > total[2.5] > total[3.0], total
    assert spearman(estimated, measured) > 0.8, list(zip(estimated, measured))


def test_checkpoint_contents(quantized):
    model, checkpoints = quantized("mixtral")
    directory = checkpoints[2.5]
    names = {p.name for p in directory.iterdir()}
    assert {
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "quantization_report.json",
        "bits_heatmap.png",
        "bits_by_rank.png",
    } <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".tmp"))]
    assert not (directory.parent / "2.5.partial").exists()
    config = json.loads((directory / "config.json").read_text())
    source = SourceCheckpoint(str(model))
    assert {k: v for k, v in config.items() if k != "quantization_config"} == source.config
    files = TensorFiles(directory)
    experts = tuple(f"{source.architecture.experts_module.format(layer=i)}." for i in source.moe_layers())
    kept = [n for n in source.tensors if not n.startswith(experts)]
    assert kept and all(torch.equal(files[n], source.get(n)) for n in kept)  # everything else unchanged
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(files)
    report = json.loads((directory / "quantization_report.json").read_text())
    assert report["allocation"]["gap"] <= 1e-3 and report["bits"]["achieved_all"] <= 2.5
    assert set(report["stages"]) == {"calibrate_and_cost", "allocate", "export", "check"}
    assert math.isfinite(report["allocation"]["lp_bound"])
    tokens = [layer["routed_tokens_per_expert"] for layer in report["layers"].values()]
    assert all(len(t) == 16 and sum(t) == 2048 * 2 for t in tokens)  # every calibration token picks top-2


def test_per_layer_allocation_keeps_every_layer_within_its_share(tiny_model_dir, quantize_tiny, tmp_path):
    model = tiny_model_dir("qwen3_moe", **QUANT_SHAPE)
    out = quantize_tiny(model, tmp_path / "q", 2.5, allocation="per-layer", scale_steps=0)
    report = json.loads((out / "quantization_report.json").read_text())
    share = report["allocation"]["budget_bits"] / len(report["layers"])
    cfg = read_quant_config(out)
    spent = dict.fromkeys((layer.module for layer in cfg.layers), 0)
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            for n in f.keys():
                if n.endswith((".codes", ".scales")):
                    spent[next(m for m in spent if n.startswith(m + "."))] += 8 * f.get_tensor(n).nbytes
    assert all(0 < bits <= share + 1e-6 for bits in spent.values()), (spent, share)
    assert report["options"]["scale_steps"] == 0 and cfg.achieved_bits["all"] <= 2.5 + 1e-9


def test_format_version_1_is_written_with_its_codes_and_read_as_such(quantized, quantize_tiny, calib_file, tmp_path):
    """--format-version 1 writes version 1's codes (FORMAT.md section 9), which loaders read as version 1: its layer
    errors are of the size of version 2's at the same bits, and read as version 2 they are not."""
    model, checkpoints = quantized("qwen3_moe")
    v1 = quantize_tiny(model, tmp_path / "v1", 2.5, calib_tokens=2048, format_version=1)
    assert read_quant_config(v1).format_version == 1 and read_quant_config(checkpoints[2.5]).format_version == 2
    errors = {v: sum(layer_errors(model, d, calib_file).values()) for v, d in ((1, v1), (2, checkpoints[2.5]))}
    assert errors[1] < 1.5 * errors[2]
    misread = shutil.copytree(v1, tmp_path / "misread")
    config = json.loads((misread / "config.json").read_text())
    config["quantization_config"]["format_version"] = 2
    (misread / "config.json").write_text(json.dumps(config))
    assert sum(layer_errors(model, misread, calib_file).values()) > 3 * errors[1]


def test_feedback_on_the_original_inputs_keeps_the_widths_and_changes_the_rounding(
    quantized, quantize_tiny, calib_file, tmp_path
):
    """--feedback-inputs original: the same allocation (it comes from the original model's costs either way), other
    codes (the Hessians of other inputs), errors of the same size."""
    model, checkpoints = quantized("qwen3_moe")
    original = quantize_tiny(model, tmp_path / "original", 2.5, calib_tokens=2048, feedback_inputs="original")
    default = checkpoints[2.5]
    assert read_quant_config(original).layers == read_quant_config(default).layers
    a, b = TensorFiles(original), TensorFiles(default)
    assert any(not torch.equal(a[n], b[n]) for n in b if n.endswith(".codes"))
    errors = [sum(layer_errors(model, d, calib_file).values()) for d in (original, default)]
    assert errors[1] < 1.5 * errors[0] and errors[0] < 1.5 * errors[1], errors


def test_the_down_projection_compensates_the_gate_and_up_by_default(
    tiny_model_dir, quantize_tiny, calib_file, tmp_path
):
    """--feedback-target projection (GPTQ's objective) against the default (layer), both on the original model's
    inputs: the same allocation and the same gate and up codes; other down codes, which bring the experts' output
    closer to the original's. 8,192 calibration tokens: 1,024 per expert for I 128 (with 2,048 the fit's damping
    leaves the two within 0.1 %)."""
    model = tiny_model_dir("qwen3_moe", **QUANT_SHAPE)
    common = {"calib_tokens": 8192, "feedback_inputs": "original"}
    own, default = (
        quantize_tiny(model, tmp_path / target, 2.5, feedback_target=target, **common)
        for target in ("projection", "layer")
    )
    assert read_quant_config(own).layers == read_quant_config(default).layers
    a, b = TensorFiles(own), TensorFiles(default)
    codes = [n for n in b if n.endswith(".codes")]
    assert all(torch.equal(a[n], b[n]) for n in codes if ".down_proj." not in n)
    assert any(not torch.equal(a[n], b[n]) for n in codes if ".down_proj." in n)
    errors = [sum(layer_errors(model, d, calib_file).values()) for d in (own, default)]
    assert errors[1] < 0.95 * errors[0], errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_device_cuda_quantizes_as_the_cpu_does(tiny_model_dir, quantize_tiny, tmp_path):
    """--device cuda runs the same code on CUDA tensors. Not byte-identical: sums run in another order there, and the
    CPU rounds through csrc/cpu/rounding.cpp where it is built, so near ties of the ILP and of rounding may go the
    other way. The same basis, nearly the same widths, the same budget and the same layer errors to a few percent."""
    model = tiny_model_dir("qwen3_moe", **QUANT_SHAPE)
    reports = {
        device: json.loads(
            (
                quantize_tiny(model, tmp_path / device, 2.5, calib_tokens=2048, device=device)
                / "quantization_report.json"
            ).read_text()
        )
        for device in ("cpu", "cuda")
    }
    cpu, gpu = reports["cpu"], reports["cuda"]
    assert gpu["options"]["device"] == "cuda" and gpu["basis"] == cpu["basis"]
    assert gpu["bits"]["achieved_all"] <= 2.5 and gpu["bits"]["achieved_all"] == pytest.approx(
        cpu["bits"]["achieved_all"], rel=0.01
    )
    moved = total = 0
    for module, layer in cpu["layers"].items():
        assert gpu["layers"][module]["routed_tokens_per_expert"] == layer["routed_tokens_per_expert"], module
        assert gpu["layers"][module]["relative_error"] == pytest.approx(layer["relative_error"], rel=0.1), module
        for p in PROJECTIONS:
            counts = [
                layer[p]["histogram"][w] - gpu["layers"][module][p]["histogram"][w] for w in layer[p]["histogram"]
            ]
            moved, total = moved + sum(map(abs, counts)), total + sum(layer[p]["histogram"].values())
    assert moved <= 0.05 * total, f"{moved} of {total} rank rows at other widths on cuda"
    assert gpu["allocation"]["loss"] == pytest.approx(cpu["allocation"]["loss"], rel=0.02)
