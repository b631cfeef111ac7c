"""The error feedback and its cost (offline.gptq) for experts that few calibration tokens reach.

An expert's Hessian of a projection's inputs (gate, up: the rank-space inputs; down: the activations) is H = Z^T Z,
Z [n, d] its n routed tokens' inputs times their routing weights, damped to H + diag(lambda) (offline.gptq.damped).
Qwen3-30B-A3B's 128 experts get 128 of 2,048 calibration tokens each on average (top-8) for d = 2048 and 768
coordinates: H has rank n << d, and everything the feedback needs comes from n x n matrices (the down projection's
target too: offline.gptq.few_tokens_corrected). With z_j the j-th column of Z, F the coordinates rounded after j, and
A_F = (I + sum_{i in F} z_i z_i^T / lambda_i)^-1 [n, n] (Woodbury):

- the damped H's Schur complement of F at j, which sets the share of j's loss the feedback leaves (offline.gptq.
  compensation), is c_j = lambda_j + z_j^T A_F z_j;
- GPTQ leaves the coordinates not yet rounded at their optimum given those rounded (the OBS update): with P the
  coordinates before j, w0 the factor and q the rounded values, coordinate j is rounded from
  w0_j + [H_RR^-1 H_RP (w0_P - q_P)]_j = w0_j + v_j^T s_j / c_j, v_j = A_F z_j, s_j = Z_P (w0_P - q_P) [n, rows].

schur computes every v_j and c_j in blocks from the last coordinate back (Y = A Z_b, S = diag(lambda_b) + Z_b^T Y,
the Cholesky factor of S with the order reversed, A updated by Woodbury): O(d n^2) where the dense path factorises
and inverts d x d matrices, O(d^3); feedback rounds in O(d n rows) against O(d^2 rows). Both paths give the same
values up to float rounding (tests/test_lowrank.py).
"""

from typing import NamedTuple

import torch

from .coordinates import sub_block
from .threads import factor_threads

BLOCK, SUB = 128, 16  # coordinates per block and per sub-block, as offline.gptq's
# the path for a batch of experts whose busiest expert's tokens are at most 1/FEW of the coordinates: its rounding
# then costs at most what the dense path's does, without the factorisations
FEW = 2


class Tokens(NamedTuple):
    """A batch of experts' Hessians H_e = Z_e^T Z_e, held as Z [E, n, d]: expert e's tokens[e] tokens, zero rows
    after."""

    z: torch.Tensor
    tokens: list[int]

    def diagonal(self, dim1: int = 1, dim2: int = 2) -> torch.Tensor:
        """[E, d]: each expert's H_jj, as the dense Hessian's diagonal."""
        return self.z.pow(2).sum(1)


def schur(z: torch.Tensor, lam: torch.Tensor, tokens: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """z [E, n, d] float64 (the coordinates in the order they are rounded), lam [E, d] -> v [E, n, d] (v_j = A_F z_j)
    and c [E, d] (the Schur complements c_j), F the coordinates after j. tokens: each expert's rows of z that are not
    padding: an expert at a time on its own rows (the work is n^2 per coordinate, and the busiest expert of a batch
    of Qwen3-30B-A3B's had 3x the mean's tokens, so 9x its work, on the 2,048 calibration tokens of
    benchmarks/README.md)."""
    if tokens is not None:
        v, c = torch.zeros_like(z), torch.empty_like(lam)
        for e, n in enumerate(tokens):
            v[e : e + 1, :n], c[e : e + 1] = schur(z[e : e + 1, :n], lam[e : e + 1])
        return v, c
    E, n, d = z.shape
    a = torch.eye(n, dtype=z.dtype, device=z.device).repeat(E, 1, 1)  # A over the coordinates after the block
    v, c = torch.empty_like(z), torch.empty_like(lam)
    for end in range(d, 0, -BLOCK):
        start = max(0, end - BLOCK)
        zb = z[:, :, start:end].flip(2)  # the block's coordinates, last first
        y = a @ zb
        s = zb.transpose(1, 2) @ y
        s.diagonal(dim1=1, dim2=2).add_(lam[:, start:end].flip(1))
        with factor_threads():  # MKL's Cholesky rounds differently with the thread count (offline.threads)
            low = torch.linalg.cholesky(s)
        w = torch.linalg.solve_triangular(low, y.transpose(1, 2), upper=False).transpose(1, 2)  # Y L^-T
        pivots = low.diagonal(dim1=1, dim2=2)
        v[:, :, start:end] = (w * pivots[:, None, :]).flip(2)
        c[:, start:end] = pivots.square().flip(1)
        a -= w @ w.transpose(1, 2)
    return v, c


def feedback(w: torch.Tensor, z: torch.Tensor, v: torch.Tensor, c: torch.Tensor, quantize) -> torch.Tensor:
    """offline.gptq.feedback for H = Z^T Z: w [E, rows, d], z [E, n, d] and schur's v, c, the coordinates in the order
    they are rounded; quantize(i, column [E, rows]) rounds coordinate i. Returns the rounded w."""
    E, rows, d = w.shape
    out = torch.empty(E, d, rows, device=w.device)  # coordinate-major, as every update below
    z = z.float()
    vc = (v / c[:, None, :]).float()
    s = torch.zeros(E, z.shape[1], rows, device=w.device)  # sum over the rounded coordinates of z_i (w0_i - q_i)^T
    for start in range(0, d, BLOCK):
        end = min(start + BLOCK, d)
        block = w[:, :, start:end].transpose(1, 2).contiguous()  # coordinate-major: a coordinate's rows are one read
        current = torch.baddbmm(block, vc[:, :, start:end].transpose(1, 2), s)
        err = torch.empty_like(current)
        within = vc[:, :, start:end].transpose(1, 2) @ z[:, :, start:end]  # [E, b, b]: v_j^T z_i / c_j
        for k0 in range(0, end - start, SUB):
            k1 = min(k0 + SUB, end - start)
            k, q = slice(k0, k1), out[:, start + k0 : start + k1]  # an error: the original value less the rounded
            sub_block(quantize, start + k0, current[:, k], block[:, k], within[:, k, k], None, q, err[:, k])
            current[:, k1:].baddbmm_(within[:, k1:, k0:k1], err[:, k0:k1])
        s.baddbmm_(z[:, :, start:end], err)
    return out.transpose(1, 2)
