"""`bitsmoe-quantize` / `python -m offline`."""

import sys


def main(argv: list[str] | None = None) -> int:
    print(
        "bitsmoe-quantize: the quantizer is not implemented yet in this version of bitsmoe-vllm "
        "(calibration, allocation and export are the next milestone); nothing was written.",
        file=sys.stderr,
    )
    return 2
