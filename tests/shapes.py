"""The one table of test shapes: awkward sizes on purpose (STYLE.md rule 6)."""

import torch

TOKENS = (1, 3, 17, 65)  # T
KERNEL_TOKENS = TOKENS + (222,)  # T for the CUDA kernels: 222 spans several 64-slot prefill tiles
ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
WIDTHS = (1, 2, 3, 4, 6, 8)  # every packed code width
ALLOCATION_WIDTHS = (0,) + WIDTHS  # widths a rank row can get, 0 = dropped
PACK_LENGTHS = (1, 5, 31, 32, 33, 37, 64, 100)  # codes per row, odd ones included
# (H, I, E, K, R per projection, G): a square one, a rank-truncated one, one with H not a multiple of 32
LAYERS = (
    (64, 64, 8, 2, (64, 64, 64), 32),
    (48, 96, 5, 3, (17, 30, 48), 32),
    (72, 128, 4, 2, (40, 72, 9), 64),
)
