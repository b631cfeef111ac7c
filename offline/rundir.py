"""A run's directory, OUT.partial: its work files and the checkpoint being assembled. The checkpoint is
moved to OUT only when complete, so OUT is either a whole, validated checkpoint or absent."""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


def write_atomic(path: Path, write) -> None:
    """write(tmp_path), then rename: a crash leaves the old file or none, never half of one. A failed write (a full
    disk: OSError from Python, SafetensorError from safetensors) removes the temporary file and raises OSError
    naming the file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.touch()  # created as any file here is (0666 less the umask), which safetensors would not do (0600)
        mode = tmp.stat().st_mode & 0o777
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:
        tmp.unlink(missing_ok=True)
        raise OSError(f"could not write {path}: {err}") from err


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    write_atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata))


class RunDir:
    def __init__(self, out: Path, identity: dict, resume: bool, overwrite: bool):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.work, self.checkpoint = self.partial / "work", self.partial / "checkpoint"
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"output directory {self.out} exists; pass --overwrite to replace it")
        run_file = self.work / "run.json"
        identity = json.loads(json.dumps(identity))  # compare as it is stored: tuples become lists
        if self.partial.exists():
            if not resume:
                raise FileExistsError(
                    f"{self.partial} holds an interrupted run; pass --resume to continue it, or delete it"
                )
            saved = json.loads(run_file.read_text()) if run_file.is_file() else {}
            changed = sorted(k for k in identity.keys() | saved.keys() if identity.get(k) != saved.get(k))
            if changed:
                raise ValueError(
                    f"--resume: {self.partial} was started with other options "
                    f"({', '.join(f'{k}: {saved.get(k)!r} then, {identity.get(k)!r} now' for k in changed)})"
                )
        self.work.mkdir(parents=True, exist_ok=True)
        self.checkpoint.mkdir(exist_ok=True)
        if not run_file.is_file():
            write_atomic(run_file, lambda tmp: tmp.write_text(json.dumps(identity, indent=2)))

    def save(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        save_tensors(self.path(name), tensors, metadata)

    def load(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """A saved work file (tensors, metadata), or None if it was never completed."""
        path = self.path(name)
        if not path.is_file():
            return None
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}

    def has(self, name: str) -> bool:
        return self.path(name).is_file()

    def path(self, name: str) -> Path:
        return self.work / f"{name}.safetensors"

    def remove(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def discard(self) -> None:
        """Remove OUT.partial: the run is not to be resumed (its checkpoint was refused)."""
        shutil.rmtree(self.partial)

    def finish(self) -> Path:
        """Move the finished checkpoint to OUT (replacing it under --overwrite) and drop the work files."""
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.checkpoint, self.out)
        shutil.rmtree(self.partial)
        return self.out
