"""bitsmoe-quantize refuses bad input, and a broken result, with one line that says what to change."""

import json
from pathlib import Path

import pytest

from bitsmoe_vllm.offline.cli import main
from bitsmoe_vllm.offline.demo import ARCHITECTURES, train_tokenizer
from tests.helpers import QUANT_SHAPE


@pytest.fixture
def run(tiny_model_dir, calib_file, tmp_path, capsys):
    """run(*extra, model=..., calib=...) -> (exit status, stderr) of bitsmoe-quantize."""

    def go(*extra, model=None, calib=None, out=None, stdout=False):
        args = [
            "--model",
            str(model or tiny_model_dir("olmoe", **QUANT_SHAPE)),
            "--out",
            str(out or tmp_path / "out"),
            "--calib",
            str(calib or calib_file),
            "--calib-tokens",
            "1024",
            "--calib-seq-len",
            "128",
            "--unit-rows",
            "8",
        ]
        if "--bits" not in extra:
            args += ["--bits", "2.5"]
        status = main(args + list(extra))
        captured = capsys.readouterr()
        return (status, captured.err, captured.out) if stdout else (status, captured.err)

    return go


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ("--bits", "0.03", "--basis-dtype", "int8"),
            "--bits 0.03 is outside the feasible range [0.0423, 8.4453] (all bits per routed-expert weight) for this "
            "model with ranks 8-64, group size 128, int8 bases",
        ),
        (
            ("--bits", "0.3", "--rank", "64", "--basis-dtype", "int8"),
            "--bits 0.3 is outside the feasible range [0.3203, 8.4453] (all bits per routed-expert weight) for this "
            "model with rank 64",
        ),
        (
            ("--bits", "9"),
            "--bits 9.0 is outside the feasible range [0.0186, 8.6875] (all bits per routed-expert weight) for this "
            "model with ranks 8-64, group size 128, int8-layer or fp16-layer or int8 or fp16 or identity bases",
        ),
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


@pytest.mark.parametrize("flag", ["--calib-tokens", "--calib-seq-len", "--workers"])
def test_counts_below_one(run, flag, capsys):
    with pytest.raises(SystemExit) as exit:
        run(flag, "0")
    assert exit.value.code == 2 and f"{flag} 0: must be positive" in capsys.readouterr().err


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
    dense = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4
    )
    transformers.AutoModelForCausalLM.from_config(dense).save_pretrained(tmp_path / "llama")
    status, err = run(model=tmp_path / "llama")
    assert (
        status == 2
        and "unsupported model_type 'llama'; supported: deepseek_v2, deepseek_v3, glm4_moe, gpt_oss, granitemoe, "
        "granitemoehybrid, granitemoeshared, mixtral, olmoe, qwen3_5_moe, qwen3_moe, qwen3_next"
        in err
    )


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
    code = "from bitsmoe_vllm.offline.source import SourceCheckpoint; print(SourceCheckpoint('tiny/olmoe').dir)"
    env = {"PATH": "", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(snapshot)


def test_full_disk_leaves_no_output_and_resume_completes(run, tmp_path, monkeypatch):
    """The disk fills while the third shard is written: no OUT, no temporary file, a message naming the file;
    --resume on a disk with room then completes a valid checkpoint."""
    from safetensors import SafetensorError

    from bitsmoe_vllm.checkpoint import validate_checkpoint
    from bitsmoe_vllm.offline import rundir

    real_save, shards = rundir.save_file, []

    def fills_up(tensors, path, metadata=None):
        if "checkpoint" in str(path):
            shards.append(path)
            if len(shards) == 3:
                Path(path).write_bytes(b"\0" * 100)  # what a full disk leaves of the file
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(rundir, "save_file", fills_up)
    status, err = run()
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    assert status == 1, err
    assert f"could not write {partial / 'checkpoint' / shards[2].name.removesuffix('.tmp')}" in err
    assert "No space left on device" in err and "rerun the same command with --resume" in err
    assert not out.exists() and not list(partial.rglob("*.tmp"))

    monkeypatch.setattr(rundir, "save_file", real_save)
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
        save_file(
            {n: t for n, t in load_file(shard).items() if ".mlp.experts." not in n}, shard, metadata={"format": "pt"}
        )
    (model / "model.safetensors.index.json").unlink(missing_ok=True)
    status, err = run(model=model)
    assert (
        status == 2
        and f"{model} has no routed experts (looked for model.layers.N.mlp.experts.0.*): not an MoE model" in err
    ), err


def test_a_broken_result_is_refused_with_one_line_and_nothing_written(run, tmp_path):
    """0.3 bits with no basis drops most channels: the guard measures the layers on held-out tokens and refuses."""
    status, err = run("--bits", "0.3", "--basis-dtype", "identity")
    lines = [line for line in err.splitlines() if line.startswith("bitsmoe-quantize:")]
    assert status == 3 and len(lines) == 1, err
    assert "has a relative output error of" in lines[0] and "on held-out calibration tokens (broken at 0.9)" in lines[0]
    assert "raise --bits above 0.3, try a shared basis (--basis-dtype int8), or pass --allow-high-error" in lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()

    status, err, out = run("--bits", "0.3", "--basis-dtype", "identity", "--allow-high-error", stdout=True)
    assert status == 0, err
    report = json.loads((tmp_path / "out" / "quantization_report.json").read_text())
    assert report["worst_relative_error"] >= 0.9
    assert f"worst layer error {report['worst_relative_error']:.3f}" in out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_defaults_at_2_5_bits_pass_the_guard_and_summarise_in_one_line(
    arch, tiny_model_dir, calib_file, tmp_path, capsys
):
    """--bits 2.5 and no other option but a smaller calibration (the tiny models' text is short)."""
    args = [
        "--model",
        str(tiny_model_dir(arch, **QUANT_SHAPE)),
        "--out",
        str(tmp_path / "out"),
        "--bits",
        "2.5",
        "--calib",
        str(calib_file),
        "--calib-tokens",
        "2048",
        "--calib-seq-len",
        "256",
    ]
    status = main(args)
    err, out = capsys.readouterr()[::-1]
    assert status == 0, err
    report = json.loads((tmp_path / "out" / "quantization_report.json").read_text())
    assert report["worst_relative_error"] < 0.9 and report["basis"]["dtype"] in ("int8", "float16", "identity")
    [summary] = out.strip().splitlines()
    assert summary.startswith(
        f"bitsmoe-quantize: wrote {tmp_path / 'out'}: {report['bits']['achieved_all']:.3f} bits per routed-expert "
        "weight"
    )
    assert f"{report['basis']['dtype']} basis of rank {report['basis']['rank']}" in summary and "MB ->" in summary


TRAINED_MOE = Path(__file__).resolve().parent.parent / "benchmarks" / "models" / "trained-moe"


@pytest.mark.slow  # the 6-layer trained MoE: ~40 s
def test_the_committed_trained_moe_at_2_5_bits_passes_the_guard(calib_file, tmp_path, capsys):
    """The trained Qwen3-MoE (32 experts of I 128 on H 256, benchmarks/train_moe.py) is the model of the shared basis's
    regime: --bits 2.5 with default options, calibrated on other English text than it was trained on, must pass."""
    args = ["--model", str(TRAINED_MOE), "--out", str(tmp_path / "out"), "--bits", "2.5", "--calib", str(calib_file)]
    args += ["--calib-tokens", "4096", "--calib-seq-len", "256"]
    status = main(args)
    err = capsys.readouterr().err
    assert status == 0, err
    report = json.loads((tmp_path / "out" / "quantization_report.json").read_text())
    assert len(report["layers"]) == 6 and report["worst_relative_error"] < 0.9
    assert abs(report["bits"]["achieved_all"] - 2.5) < 0.01
