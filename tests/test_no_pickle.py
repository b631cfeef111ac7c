"""No pickle anywhere: checkpoints, work files and reports are safetensors and JSON (and PNG plots); no code of
ours reads or writes a pickle, and a model stored only as pickles is refused rather than unpickled."""

import ast
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import torch

from bitsmoe_vllm.offline.cli import main
from tests.helpers import QUANT_SHAPE, quantize_command

REPO = Path(__file__).resolve().parent.parent
SOURCES = [
    p
    for d in ("bitsmoe_vllm", "offline", "benchmarks", "tests", "scripts")
    for p in (REPO / d).rglob("*.py")
    if p != Path(__file__).resolve()
]  # this file writes one pickle, to check that it is refused
ALLOWED_SUFFIXES = {".safetensors", ".json", ".png", ".jinja", ".txt", ".model"}  # .txt/.model/.jinja: tokenizer files
PICKLE_MAGIC = (
    b"\x80\x02",
    b"\x80\x03",
    b"\x80\x04",
    b"\x80\x05",
    b"PK\x03\x04",
)  # pickle protocols 2-5; torch.save's zip


def calls_and_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            )
            yield "import", names, node
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            yield "call", [ast.unparse(node.func)], node


def test_no_code_of_ours_pickles():
    assert len(SOURCES) > 40
    found = []
    for path in SOURCES:
        for kind, names, node in calls_and_imports(path):
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if kind == "import" and any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for n in names):
                found.append(f"{where} imports {names}")
            if kind == "call" and names[0] in ("torch.save", "pickle.dump", "pickle.load", "np.load", "numpy.load"):
                found.append(f"{where} calls {names[0]}")
            if kind == "call" and names[0] == "torch.load":
                weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                if not weights_only or ast.unparse(weights_only[0].value) != "True":
                    found.append(f"{where} calls torch.load without weights_only=True")
    assert not found, found


def assert_no_pickles(directory: Path) -> int:
    files = [p for p in directory.rglob("*") if p.is_file()]
    for path in files:
        # x.safetensors.tmp: an atomic write the kill interrupted (offline/rundir.py; x.safetensors is untouched);
        # .tmpXXXXXX: safetensors' own file being written (its save_file writes a temporary file, then renames it)
        being_written = re.fullmatch(r"\.tmp[A-Za-z0-9]{6}", path.name) is not None
        suffix = ".safetensors" if being_written else Path(path.stem).suffix if path.suffix == ".tmp" else path.suffix
        assert suffix in ALLOWED_SUFFIXES, f"{path}: not safetensors, JSON or a plot"
        head = path.read_bytes()[:9]
        if being_written:  # cut anywhere: at most its header's length and opening brace to check
            assert len(head) < 9 or head[8:9] == b"{", f"{path} is not a safetensors file"
        elif suffix == ".safetensors" and head:
            # a safetensors file opens with its JSON header's length (8 bytes, little-endian) and the header: that
            # length may itself start with a pickle's bytes (a header of 0x480 bytes: 80 04 00 00 ...)
            assert head[8:9] == b"{", f"{path} is not a safetensors file"
            assert int.from_bytes(head[:8], "little") < path.stat().st_size, f"{path} is not a safetensors file"
        else:
            assert not head.startswith(PICKLE_MAGIC), f"{path} is a pickle"
    return len(files)


def test_checkpoint_and_work_files_are_safetensors_and_json(tiny_model_dir, calib_file, tmp_path):
    """A run killed during export leaves its work files; the finished run leaves the checkpoint."""
    model, out = tiny_model_dir("olmoe", **QUANT_SHAPE), tmp_path / "out"
    command = quantize_command(model, out, calib_file, calib_tokens=1024)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards, deadline = tmp_path / "out.partial" / "checkpoint", time.monotonic() + 300
    while not any(shards.glob("model-00002-*.safetensors")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before export"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert assert_no_pickles(tmp_path / "out.partial") >= 4  # run.json, calibration and allocation files, shards
    subprocess.run([*command, "--resume"], check=True, capture_output=True)
    assert assert_no_pickles(out) >= 6


def test_a_model_stored_as_pickles_is_refused(calib_file, tmp_path, capsys):
    model = tmp_path / "pickled"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "olmoe", "num_hidden_layers": 1}')
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, model / "pytorch_model.bin")  # what we must not load
    status = main(["--model", str(model), "--out", str(tmp_path / "out"), "--bits", "2.5", "--calib", str(calib_file)])
    err = capsys.readouterr().err
    assert status == 2 and f"no *.safetensors file in {model}" in err, err
