"""Shared-basis spectral decomposition of one projection of one MoE layer (DESIGN.md section 2).

Every projection is handled in the orientation W_e [I, H] (gate and up as stored; down transposed):
the basis V [R, H] is the top-R eigenvectors of sum_e W_e^T W_e (the right singular vectors of
the stacked [E*I, H] matrix), and expert e's rank-major factor is F_e = V W_e^T [R, I], so that
W_e = F_e^T V exactly when R = H. With an identity basis (none stored) V = I: F_e = W_e^T, and rank rows
are the input channels (gate, up) or output channels (down). One basis per layer (basis_sharing "layer") is the
top-R eigenvectors of the three projections' sums added: gate and up read the residual stream and down writes it, so
one set of directions can serve all three.
"""

from typing import NamedTuple

import torch

from .threads import factor_threads

GRAM_BYTES = 1 << 28  # float32 bytes of the experts in one product of top_basis


class Decomposition(NamedTuple):
    basis: torch.Tensor | None  # [R, H] float32, orthonormal rows (down stores it transposed); None: identity
    factors: torch.Tensor  # [E, R, I] rank-major: float32 (identity: the weights' dtype, offline.source.EXACT_DTYPES)
    energy: torch.Tensor  # [R] float64: eigenvalues, i.e. the energy of all experts along each basis row


def top_basis(weights: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert weights [E, I, H] -> the shared basis [R, H] float32 (orthonormal rows) and its energy [R] float64."""
    return top_eigenvectors(gram(weights), rank)


def gram(weights: torch.Tensor) -> torch.Tensor:
    """sum_e W_e^T W_e [H, H] float64 of expert weights [E, I, H]."""
    H = weights.shape[-1]
    out = torch.zeros(H, H, dtype=torch.float64, device=weights.device)
    # a batch of experts at a time, one float32 product each, summed in float64: an expert at a time in float64 took
    # 29 s of a Qwen3-30B-A3B-shaped layer's 340, twice float32's time here; a float64 copy of a whole layer would not
    # fit for large models
    step = max(1, GRAM_BYTES // (4 * weights[0].numel()))
    for start in range(0, len(weights), step):
        w = weights[start : start + step].float().reshape(-1, H)
        out += (w.T @ w).double()
    return out


def top_eigenvectors(gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top `rank` eigenvectors of a Gram matrix [H, H] as rows [R, H] float32, and their eigenvalues [R]."""
    H = gram.shape[-1]
    if not 1 <= rank <= H:
        raise ValueError(f"shared_basis: rank must be in 1..{H} (hidden size), got {rank}")
    with factor_threads():
        energy, vectors = torch.linalg.eigh(gram)  # ascending
    energy, vectors = energy.flip(0)[:rank], vectors.flip(1)[:, :rank]  # [R], [H, R]
    # eigh fixes a vector only up to sign: make each one's largest entry positive so results are reproducible.
    peak = vectors.abs().argmax(0)
    vectors = vectors * vectors[peak, torch.arange(rank, device=vectors.device)].sign()
    return vectors.T.float().contiguous(), energy.clamp_min(0)


def project(weights: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Expert factors [E, R, I] = basis W_e^T, float32; None is the identity basis (factors W_e^T [E, H, I] in the
    weights' dtype, which users convert a batch of experts at a time)."""
    if basis is None:  # a view: a layer's weights are GBs, and nothing writes into factors
        return weights.transpose(1, 2)
    return torch.stack([basis @ w.float().T for w in weights])


def shared_basis(weights: torch.Tensor, rank: int) -> Decomposition:
    """Decompose expert weights [E, I, H] (gate/up as stored, down as D_e^T) with shared rank R <= H."""
    return decompose(weights, rank, "shared")


def decompose(
    weights: torch.Tensor, rank: int, basis_dtype: str, basis: tuple[torch.Tensor, torch.Tensor] | None = None
) -> Decomposition:
    """The shared-basis decomposition at `rank`, or for basis_dtype "identity" the one with V = I (rank H):
    factors W_e^T [E, H, I], energy per channel. `basis`: top_basis(weights, R) with R >= rank, computed before (the
    top `rank` rows of it are top_basis at `rank`)."""
    if basis_dtype == "identity":
        factors = project(weights, None)
        energy = sum(f.double().pow(2).sum((0, 2)) for f in factors.split(1))  # an expert at a time: no float64 copy
        return Decomposition(None, factors, energy)
    vectors, energy = top_basis(weights, rank) if basis is None else (basis[0][:rank], basis[1][:rank])
    return Decomposition(vectors, project(weights, vectors), energy)
