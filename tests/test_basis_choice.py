"""What --basis-dtype auto (the default) and --rank auto take: the identity where a shared basis must be cut, a
shared basis where the experts share few directions, one basis per layer where the projections share theirs, the
kind chosen on the first MoE layer's costs."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitsmoe_vllm.checkpoint import TensorFiles, read_quant_config
from bitsmoe_vllm.format import PROJECTIONS
from tests.helpers import QUANT_SHAPE
from tests.test_quantize import expert_bits_on_disk, layer_errors


def test_auto_rank_takes_the_best_candidate_and_fits_few_experts(tiny_model_dir, quantize_tiny, tmp_path):
    """With 2 experts of I 64 (H 64), full-rank int8 bases alone cost 8 * 64 / (2 * 64) = 4 bits per weight:
    --rank auto must drop rows to fit 2.5 bits, pick the candidate of least estimated loss, and store that rank."""
    model = tiny_model_dir("mixtral", layers=2, experts=2, intermediate=64)
    out = quantize_tiny(model, tmp_path / "q", 2.5, basis_dtype="int8", allow_high_error=True)  # the guard refuses it
    allocation = json.loads((out / "quantization_report.json").read_text())["allocation"]
    bounds = {int(r): b for r, b in allocation["rank_estimates"].items()}
    assert bounds[64] == math.inf and allocation["rank"] < 64
    assert allocation["rank"] == min(bounds, key=bounds.get)
    cfg = read_quant_config(out)
    assert {getattr(layer, p).rank for layer in cfg.layers for p in PROJECTIONS} == {allocation["rank"]}
    assert cfg.achieved_bits["all"] <= 2.5 + 1e-9
    stored, weights = expert_bits_on_disk(out)
    assert stored / weights == pytest.approx(cfg.achieved_bits["all"], rel=1e-9)


def test_auto_basis_takes_the_identity_when_a_shared_basis_must_be_cut(
    tiny_model_dir, quantize_tiny, calib_file, tmp_path, capsys
):
    """Same model: the shared bases would cost 4 bits per weight at full rank, so at 2.5 bits an identity basis (no
    basis stored, full rank) gives a smaller measured output error than the cut rank; --basis-dtype auto (the
    default) takes it, and an explicit shared basis warns."""
    model = tiny_model_dir("mixtral", layers=2, experts=2, intermediate=64)
    shared = quantize_tiny(model, tmp_path / "shared", 2.5, basis_dtype="int8", allow_high_error=True)
    assert "--basis-dtype auto chooses between shared and identity bases" in capsys.readouterr().err
    identity = quantize_tiny(model, tmp_path / "identity", 2.5)
    cfg = read_quant_config(identity)
    assert cfg.basis_dtype == "identity" and {getattr(layer, p).rank for layer in cfg.layers for p in PROJECTIONS} == {
        64
    }
    assert not [n for n in TensorFiles(identity) if n.endswith(".basis")]
    stored, weights = expert_bits_on_disk(identity)
    assert 2.45 < stored / weights <= 2.5
    errors = {
        name: sum(layer_errors(model, d, calib_file).values())
        for name, d in (("shared", shared), ("identity", identity))
    }
    assert errors["identity"] < 0.5 * errors["shared"], errors


SPECTRUM = torch.linspace(4, 2, 16)


def low_rank_model(tiny_model_dir, path: Path, per_layer: bool) -> Path:
    """Experts whose weights all lie in the same 16 of 64 directions, with energies falling along them: one set per
    layer and projection kind (gate and up's inputs, down's outputs), or with per_layer one set for all three."""
    shutil.copytree(tiny_model_dir("qwen3_moe", **QUANT_SHAPE), path)
    g = torch.Generator().manual_seed(0)
    for shard in path.glob("*.safetensors"):
        tensors = load_file(shard)
        directions = {}
        for name, t in tensors.items():
            if ".mlp.experts." in name:
                kind, layer = name.rsplit(".", 2)[-2], name.split(".mlp.")[0]
                down = kind == "down_proj"
                key = layer if per_layer else (layer, down)
                shared = directions.setdefault(key, torch.linalg.qr(torch.randn(64, 16, generator=g))[0])  # [H, 16]
                # [I, 16]: orthonormal columns scaled alike in every expert and projection, so that every sum of
                # W^T W has the same eigenvectors
                own = torch.linalg.qr(torch.randn(t.shape[1 if down else 0], 16, generator=g))[0] * SPECTRUM
                tensors[name] = (shared @ own.T) if down else (own @ shared.T)
        save_file(tensors, shard, metadata={"format": "pt"})
    return path


def test_auto_basis_takes_a_shared_basis_when_the_experts_share_few_directions(
    tiny_model_dir, quantize_tiny, calib_file, tmp_path
):
    """A shared basis of rank 16 holds such experts exactly and spends the budget on 16 rows, the identity on 64
    channels; the gate/up and down directions differ, so one basis per layer would need 32 rows and a basis per
    projection is taken."""
    model = low_rank_model(tiny_model_dir, tmp_path / "low-rank", per_layer=False)
    auto = quantize_tiny(model, tmp_path / "auto", 2.5)
    identity = quantize_tiny(model, tmp_path / "identity", 2.5, basis_dtype="identity")
    report = json.loads((auto / "quantization_report.json").read_text())
    cfg = read_quant_config(auto)
    assert cfg.basis_dtype in ("int8", "float16") and report["basis"]["rank"] < 64, report["basis"]
    assert cfg.basis_sharing == "projection", report["allocation"]["estimated_loss_nearest"]
    estimated = report["allocation"]["screen"]["estimated_loss"]  # every kind, on the first layer's costs
    assert estimated[report["allocation"]["basis"]] < estimated["identity"]
    errors = {
        name: sum(layer_errors(model, d, calib_file).values()) for name, d in (("auto", auto), ("identity", identity))
    }
    assert errors["auto"] < 0.5 * errors["identity"], errors


def test_auto_basis_takes_one_basis_per_layer_when_the_projections_share_their_directions(
    tiny_model_dir, quantize_tiny, calib_file, tmp_path
):
    """Gate, up and down in the same 16 directions: one basis per layer holds all three and costs a third of three
    bases, which the default takes; it is stored once per layer and beats three bases of its dtype at the same bits,
    in int8 too (the gate's row scales and down's one scale stored)."""
    model = low_rank_model(tiny_model_dir, tmp_path / "low-rank", per_layer=True)
    auto = quantize_tiny(model, tmp_path / "auto", 2.0)
    report = json.loads((auto / "quantization_report.json").read_text())
    cfg = read_quant_config(auto)
    assert cfg.basis_sharing == "layer", report["allocation"]["estimated_loss_nearest"]
    assert report["basis"] == {"dtype": cfg.basis_dtype, "sharing": "layer", "rank": report["allocation"]["rank"]}
    assert sorted(n.split(".experts.0.")[1] for n in TensorFiles(auto) if ".basis" in n) == ["gate_proj.basis"] * 4
    stored, weights = expert_bits_on_disk(auto)
    assert stored / weights == pytest.approx(cfg.achieved_bits["all"], rel=1e-9) and stored / weights <= 2.0
    runs = {"auto": auto, "int8-layer": quantize_tiny(model, tmp_path / "int8-layer", 2.0, basis_dtype="int8-layer")}
    for basis in ("fp16", "int8"):
        runs[basis] = quantize_tiny(model, tmp_path / basis, 2.0, basis_dtype=basis)
    bases = sorted(n.split(".experts.0.")[1] for n in TensorFiles(runs["int8-layer"]) if ".basis" in n)
    assert bases == sorted(["gate_proj.basis", "gate_proj.basis_scale", "down_proj.basis_scale"] * 4)
    errors = {name: sum(layer_errors(model, d, calib_file).values()) for name, d in runs.items()}
    # one basis per layer beats three of its dtype: the int8 one reaches down through its factor rows' scales
    assert errors["auto"] < errors["fp16" if cfg.basis_dtype == "float16" else "int8"], errors
    assert errors["int8-layer"] < errors["int8"], errors


def test_the_layers_after_the_first_are_costed_for_the_kind_of_basis_the_first_chooses(
    tiny_model_dir, quantize_tiny, tmp_path, monkeypatch
):
    """The first MoE layer is costed for every kind of basis and chooses one on its own share of the budget; the
    later layers are costed for that kind only, and where it is the kind all layers choose, the checkpoint is the
    same, byte for byte, as costing every kind on every layer."""
    from bitsmoe_vllm.offline import quantize as quantize_module

    model = low_rank_model(tiny_model_dir, tmp_path / "low-rank", per_layer=False)
    screened = quantize_tiny(model, tmp_path / "screened", 2.5)
    allocation = json.loads((screened / "quantization_report.json").read_text())["allocation"]
    assert allocation["screen"]["layer"] == 0 and allocation["screen"]["kind"] == "shared", allocation["screen"]
    assert set(allocation["screen"]["estimated_loss"]) == {"int8-layer", "fp16-layer", "int8", "fp16", "identity"}
    assert set(allocation["estimated_loss"]) == {"int8", "fp16"}  # the other kinds were not costed past layer 0
    monkeypatch.setattr(quantize_module, "screens", lambda plan: False)
    every = quantize_tiny(model, tmp_path / "every", 2.5)
    report = json.loads((every / "quantization_report.json").read_text())
    assert "screen" not in report["allocation"] and len(report["allocation"]["estimated_loss"]) == 5
    assert report["basis"]["sharing"] == "projection"
    files = sorted(p.name for p in screened.glob("*.safetensors"))
    assert files == sorted(p.name for p in every.glob("*.safetensors")) and files
    for name in [*files, "config.json"]:
        assert (screened / name).read_bytes() == (every / name).read_bytes(), name
