"""kill -9 in the middle of bitsmoe-quantize, then --resume: the same checkpoint, byte for byte."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import safetensors.torch

from tests.helpers import QUANT_SHAPE, checkpoint_bytes, quantize_command

SHAPE = {**QUANT_SHAPE, "layers": 6}


def kill_when(proc: subprocess.Popen, path_ready, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path_ready():
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before the kill point"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def assert_same_checkpoint(directory: Path, expected: dict[str, bytes]) -> None:
    """The same files with the same bytes; else the message names the tensors that differ, and in how many elements
    (CI's log shows the first line of it)."""
    ours = checkpoint_bytes(directory)
    assert sorted(ours) == sorted(expected)
    differ = []
    for name in (n for n in ours if ours[n] != expected[n]):
        if not name.endswith(".safetensors"):
            differ.append(name)
            continue
        a, b = safetensors.torch.load(ours[name]), safetensors.torch.load(expected[name])
        differ += [f"{k} ({(a[k] != b[k]).sum().item()} of {a[k].numel()})" for k in sorted(a) if not a[k].equal(b[k])]
    assert not differ, "differ (elements of the tensors): " + ", ".join(differ)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, calib_file, tmp_path_factory):
    model = tiny_model_dir("qwen3_moe", **SHAPE)
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    subprocess.run(quantize_command(model, out, calib_file), check=True, capture_output=True)
    return model, checkpoint_bytes(out)


@pytest.mark.slow  # ~15 s
def test_two_runs_give_identical_bytes(uninterrupted, calib_file, tmp_path):
    # what resuming relies on: the float work is reproducible from one process to the next on a given machine
    model, expected = uninterrupted
    subprocess.run(quantize_command(model, tmp_path / "again", calib_file), check=True, capture_output=True)
    assert_same_checkpoint(tmp_path / "again", expected)


@pytest.mark.slow  # a quantization killed and resumed: 20-26 s each
@pytest.mark.parametrize("kill_point", ["calibration", "allocation", "export", "finish"])
def test_resume_after_kill_gives_identical_bytes(kill_point, uninterrupted, calib_file, tmp_path):
    model, expected = uninterrupted

    out = tmp_path / "killed"
    work, shards = tmp_path / "killed.partial" / "work", tmp_path / "killed.partial" / "checkpoint"
    ready = {
        "calibration": lambda: (work / "layer-00002.safetensors").is_file(),  # 3 of 6 layers calibrated
        "allocation": lambda: (work / "allocation.safetensors").is_file(),  # bits chosen, no shard written
        "export": lambda: any(shards.glob("model-00002-*.safetensors")),  # 2 of 7 shards written
        "finish": lambda: (
            shards / "config.json"
        ).is_file(),  # all shards and config.json; validation, report, move to come
    }[kill_point]
    kill_when(
        subprocess.Popen(
            quantize_command(model, out, calib_file), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ),
        ready,
    )
    assert not out.exists()  # nothing half-written in place

    refused = subprocess.run(quantize_command(model, out, calib_file), capture_output=True, text=True)
    assert refused.returncode == 2 and "pass --resume to continue it" in refused.stderr

    subprocess.run(quantize_command(model, out, calib_file, "--resume"), check=True, capture_output=True)
    assert_same_checkpoint(out, expected)
    assert not (tmp_path / "killed.partial").exists()


@pytest.mark.slow  # ~25 s
def test_workers_give_the_bytes_of_one_process(uninterrupted, calib_file, tmp_path):
    model, expected = uninterrupted
    subprocess.run(
        quantize_command(model, tmp_path / "w", calib_file, "--workers", "2"), check=True, capture_output=True
    )
    assert_same_checkpoint(tmp_path / "w", expected)


@pytest.mark.slow  # two runs, ~20 s each
def test_workers_export_independent_layers_with_the_bytes_of_one_process(uninterrupted, calib_file, tmp_path):
    # on the original model's inputs the layers' rounding is independent: the workers export them too
    model, _ = uninterrupted
    for workers in ("1", "2"):
        command = quantize_command(model, tmp_path / workers, calib_file, "--feedback-inputs", "original")
        subprocess.run([*command, "--workers", workers], check=True, capture_output=True)
    assert_same_checkpoint(tmp_path / "2", checkpoint_bytes(tmp_path / "1"))


def spawned_children(pid: int) -> list[str]:
    """pid's children started by multiprocessing's spawn (not its resource tracker)."""
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except FileNotFoundError:  # ended between the two reads
            pass
    return found


@pytest.mark.slow  # the workers killed while they cost, the run resumed in one process: ~30 s
def test_a_run_whose_workers_are_killed_says_so_and_resumes_in_one_process(uninterrupted, calib_file, tmp_path):
    model, expected = uninterrupted
    out, work = tmp_path / "killed", tmp_path / "killed.partial" / "work"
    command = quantize_command(model, out, calib_file)
    err = tmp_path / "stderr.txt"
    with err.open("w") as f:
        proc = subprocess.Popen([*command, "--workers", "2"], stdout=subprocess.DEVNULL, stderr=f)
    deadline, workers = time.monotonic() + 120, []
    # a layer walked, its costs not saved yet, and the workers it was handed to started: the pool spawns them on
    # the first job, just after the walked layer is saved, and a child's cmdline is its parent's until it execs
    while not (workers and any(work.glob("walked-*.safetensors"))):
        assert proc.poll() is None and time.monotonic() < deadline, "the workers never got a layer"
        time.sleep(0.005)
        workers = spawned_children(proc.pid)
    for pid in workers:
        os.kill(int(pid), signal.SIGKILL)
    assert proc.wait(timeout=120) == 1
    assert "a --workers process ended abruptly" in err.read_text()
    assert not out.exists() and any(work.glob("walked-*.safetensors"))
    subprocess.run([*command, "--resume"], check=True, capture_output=True)
    assert_same_checkpoint(out, expected)
