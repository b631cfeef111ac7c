"""Reading a BitsMoE checkpoint from disk (bitsmoe_vllm/checkpoint.py) when its files are damaged: each
error names the file or tensor and says what was expected. check_files is what vLLM runs before loading
(tests/test_vllm_serve.py::test_bad_checkpoints_are_refused_at_load)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitsmoe_vllm.checkpoint import WEIGHTS_INDEX, TensorFiles, check_files, validate_checkpoint
from tests.helpers import MODULE, random_checkpoint

CFG, TENSORS = random_checkpoint(64, 64, 4, (64, 40, 64), 32)
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@pytest.fixture
def checkpoint(tmp_path):
    """A two-shard BitsMoE checkpoint: experts 0-1 in the first shard, the rest in the second."""
    first = {n: t for n, t in TENSORS.items() if n.startswith((f"{MODULE}.0.", f"{MODULE}.1."))}
    second = {n: t for n, t in TENSORS.items() if n not in first}
    for shard, tensors in zip(SHARDS, (first, second)):
        save_file(tensors, tmp_path / shard, metadata={"format": "pt"})
    index = {"weight_map": {n: SHARDS[0] if n in first else SHARDS[1] for n in TENSORS}}
    (tmp_path / WEIGHTS_INDEX).write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "test", "quantization_config": CFG.to_dict()}))
    return tmp_path


def test_an_intact_checkpoint_validates(checkpoint):
    assert validate_checkpoint(checkpoint) == CFG
    check_files(checkpoint, CFG)


@pytest.mark.parametrize("keep", [0, 5, 100, -1])
def test_a_truncated_shard_is_named(checkpoint, keep):
    path = checkpoint / SHARDS[1]
    data = path.read_bytes()
    path.write_bytes(data[: keep if keep >= 0 else len(data) - 1])
    for load in (TensorFiles, validate_checkpoint, lambda d: check_files(d, CFG)):
        with pytest.raises(ValueError) as err:
            load(checkpoint)
        assert str(err.value).startswith(f"{path} ({path.stat().st_size} bytes) is truncated or not a safetensors file")
        assert "copy or download it again" in str(err.value)


def test_a_missing_shard_is_named(checkpoint):
    (checkpoint / SHARDS[0]).unlink()
    for load in (TensorFiles, validate_checkpoint, lambda d: check_files(d, CFG)):
        with pytest.raises(
            FileNotFoundError, match=f"shard {SHARDS[0]} named in {checkpoint / WEIGHTS_INDEX} is missing"
        ):
            load(checkpoint)


def edit_second_shard(checkpoint, edit):
    tensors = load_file(checkpoint / SHARDS[1])
    edit(tensors)
    save_file(tensors, checkpoint / SHARDS[1], metadata={"format": "pt"})
    index = {
        "weight_map": {**{n: SHARDS[0] for n in load_file(checkpoint / SHARDS[0])}, **dict.fromkeys(tensors, SHARDS[1])}
    }
    (checkpoint / WEIGHTS_INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.pop(f"{MODULE}.3.up_proj.scales"),
            f"BitsMoE checkpoint is missing tensor '{MODULE}.3.up_proj.scales' (expected torch.float16 [",
        ),
        (
            lambda t: t.update({f"{MODULE}.2.gate_proj.codes": t[f"{MODULE}.2.gate_proj.codes"].long()}),
            f"tensor '{MODULE}.2.gate_proj.codes' in {SHARDS[1]}: expected torch.int32 [",
        ),
        (
            lambda t: t.update({f"{MODULE}.3.down_proj.bits": t[f"{MODULE}.3.down_proj.bits"][:-1].clone()}),
            f"tensor '{MODULE}.3.down_proj.bits' in {SHARDS[1]}: expected torch.uint8 [64], found torch.uint8 [63]",
        ),
        (
            lambda t: t.update({f"{MODULE}.3.down_proj.weight": torch.zeros(2, 2)}),
            f"unexpected tensor '{MODULE}.3.down_proj.weight' in {SHARDS[1]}",
        ),
        (
            lambda t: t.update(
                {
                    f"{MODULE}.2.up_proj.bits": t[f"{MODULE}.2.up_proj.bits"].masked_fill(
                        t[f"{MODULE}.2.up_proj.bits"] == 4, 5
                    )
                }
            ),
            f"tensor '{MODULE}.2.up_proj.bits': bit-width 5 is not in candidate_bits [0, 1, 2, 3, 4, 6, 8]",
        ),
    ],
    ids=["missing", "dtype", "shape", "unexpected", "bits"],
)
def test_file_checks_name_the_tensor(checkpoint, edit, message):
    edit_second_shard(checkpoint, edit)
    with pytest.raises(ValueError) as err:
        check_files(checkpoint, CFG)
    assert str(err.value).startswith(message), err.value


def test_a_broken_index_is_named(checkpoint):
    (checkpoint / WEIGHTS_INDEX).write_text('{"weight_map": ')
    with pytest.raises(ValueError, match=f"{checkpoint / WEIGHTS_INDEX}: not a safetensors index"):
        TensorFiles(checkpoint)


@pytest.mark.parametrize(
    "name, value", [(f"{MODULE}.2.down_proj.scales", float("nan")), (f"{MODULE}.0.gate_proj.basis", float("inf"))]
)
def test_nan_or_inf_in_a_scale_or_basis_is_named(checkpoint, name, value):
    shard = json.loads((checkpoint / WEIGHTS_INDEX).read_text())["weight_map"][name]
    tensors = load_file(checkpoint / shard)
    tensors[name] = tensors[name].index_fill(0, torch.tensor([0]), value)
    save_file(tensors, checkpoint / shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"tensor '{name}': holds NaN or Inf"):
        validate_checkpoint(checkpoint)
    with pytest.raises(ValueError, match=f"tensor '{name}' in {shard}: holds NaN or Inf"):
        check_files(checkpoint, CFG)


def test_an_unknown_format_version_is_named(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"]["format_version"] = 7
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: quantization_config.format_version: unknown version 7"):
        validate_checkpoint(checkpoint)
