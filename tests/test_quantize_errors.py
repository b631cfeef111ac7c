"""bitsmoe-quantize refuses bad input with one line that says what to change."""

from pathlib import Path

import pytest

from offline.cli import main
from tests.conftest import QUANT_SHAPE
from tests.tiny_models import train_tokenizer


@pytest.fixture
def run(tiny_model_dir, calib_file, tmp_path, capsys):
    """run(*extra, model=..., calib=...) -> (exit status, stderr) of bitsmoe-quantize."""

    def go(*extra, model=None, calib=None, out=None):
        args = ["--model", str(model or tiny_model_dir("olmoe", **QUANT_SHAPE)), "--out", str(out or tmp_path / "out"),
                "--calib", str(calib or calib_file), "--calib-tokens", "1024", "--calib-seq-len", "128", "--unit-rows", "8"]  # fmt: skip
        if "--bits" not in extra:
            args += ["--bits", "2.5"]
        status = main(args + list(extra))
        return status, capsys.readouterr().err

    return go


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--bits", "0.03"), "--bits 0.03 is outside the feasible range [0.0423, 8.4453] (all bits per routed-expert weight) for this model with ranks 8-64"),
        (("--bits", "0.3", "--rank", "64"), "--bits 0.3 is outside the feasible range [0.3203, 8.4453] (all bits per routed-expert weight) for this model with rank 64"),
        (("--bits", "9"), "--bits 9.0 is outside the feasible range [0.0423, 8.4453]"),
        (("--rank", "65"), "--rank 65: must be between 1 and the hidden size 64"),
        (("--basis-dtype", "identity", "--rank", "32"), "--rank 32: an identity basis has rank 64 (the hidden size)"),
        (("--group-size", "48"), "--group-size 48: must be a multiple of 32 that divides"),
        (("--candidate-bits", "0,5"), "--candidate-bits [0, 5]: expected widths from [0, 1, 2, 3, 4, 6, 8]"),
        (("--calib-tokens", "999999"), "fewer than --calib-tokens 999999 needs"),
    ],
)
def test_bad_options(run, extra, message):
    status, err = run(*extra)
    assert status == 2 and message in err, err


def test_missing_model_and_calibration(run, tmp_path):
    status, err = run(model=tmp_path / "nowhere")
    assert status == 2 and "is neither a directory nor a model id in the local Hugging Face cache" in err
    status, err = run(calib=tmp_path / "missing.txt")
    assert status == 2 and f"calibration file {tmp_path / 'missing.txt'} not found" in err
    (tmp_path / "empty.jsonl").write_text('{"text": " "}\n')
    status, err = run(calib=tmp_path / "empty.jsonl")
    assert status == 2 and "hold no text" in err


def test_unsupported_or_dense_model(run, tmp_path):
    import transformers

    tokenizer = train_tokenizer()
    dense = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4)  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(dense).save_pretrained(tmp_path / "llama")
    status, err = run(model=tmp_path / "llama")
    assert status == 2 and "unsupported model_type 'llama'; supported: deepseek_v2, mixtral, olmoe, qwen3_moe" in err


def test_existing_output_and_changed_resume(run, tmp_path):
    (tmp_path / "taken").mkdir()
    status, err = run(out=tmp_path / "taken")
    assert status == 2 and "exists; pass --overwrite to replace it" in err
    (tmp_path / "out.partial" / "work").mkdir(parents=True)
    (tmp_path / "out.partial" / "work" / "run.json").write_text('{"bits": 3.0}')
    status, err = run("--resume")
    assert status == 2 and "was started with other options" in err and "bits: 3.0 then, 2.5 now" in err


def test_a_model_id_in_the_local_hub_cache_is_found(tiny_model_dir, tmp_path):
    """A model already in the Hugging Face cache is read from there with no network access."""
    import shutil
    import subprocess
    import sys

    snapshot = tmp_path / "hub" / "models--tiny--olmoe" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_dir("olmoe"), snapshot)
    (tmp_path / "hub" / "models--tiny--olmoe" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny--olmoe" / "refs" / "main").write_text(snapshot.name)
    code = "from offline.source import SourceCheckpoint; print(SourceCheckpoint('tiny/olmoe').dir)"
    env = {"PATH": "", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(snapshot)


def test_full_disk_leaves_no_output_and_resume_completes(run, tmp_path, monkeypatch):
    """The disk fills while the third shard is written: no OUT, no temporary file, a message naming the file;
    --resume on a disk with room then completes a valid checkpoint."""
    from safetensors import SafetensorError

    import offline.rundir
    from bitsmoe_vllm.checkpoint import validate_checkpoint

    real_save, shards = offline.rundir.save_file, []

    def fills_up(tensors, path, metadata=None):
        if "checkpoint" in str(path):
            shards.append(path)
            if len(shards) == 3:
                Path(path).write_bytes(b"\0" * 100)  # what a full disk leaves of the file
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(offline.rundir, "save_file", fills_up)
    status, err = run()
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    assert status == 1, err
    assert f"could not write {partial / 'checkpoint' / shards[2].name.removesuffix('.tmp')}" in err
    assert "No space left on device" in err and "rerun the same command with --resume" in err
    assert not out.exists() and not list(partial.rglob("*.tmp"))

    monkeypatch.setattr(offline.rundir, "save_file", real_save)
    status, err = run("--resume")
    assert status == 0, err
    assert validate_checkpoint(out).num_experts > 0 and not partial.exists()


def test_a_supported_family_without_experts_is_not_an_moe(run, tiny_model_dir, tmp_path):
    """An OLMoE config whose checkpoint holds no routed-expert weights (a dense model saved under an MoE type)."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "no-experts"
    shutil.copytree(tiny_model_dir("olmoe", **QUANT_SHAPE), model)
    for shard in model.glob("*.safetensors"):
        save_file({n: t for n, t in load_file(shard).items() if ".mlp.experts." not in n}, shard, metadata={"format": "pt"})
    (model / "model.safetensors.index.json").unlink(missing_ok=True)
    status, err = run(model=model)
    assert status == 2 and f"{model} has no routed experts (looked for model.layers.N.mlp.experts.0.*): not an MoE model" in err, err
