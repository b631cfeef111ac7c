"""Random BitsMoE layers for tests: orthonormal bases, random factors, random per-row widths."""

import torch

from bitsmoe_vllm.format import PROJECTIONS, QuantConfig
from offline.architectures import STANDARD_NAMES
from offline.decompose import Decomposition
from offline.encode import build_quant_config, encode_layer
from tests.shapes import ALLOCATION_WIDTHS

MODULE = "model.layers.0.mlp.experts"


def random_checkpoint(
    H: int, I: int, E: int, ranks: tuple[int, int, int], G: int, *, widths=ALLOCATION_WIDTHS,
    basis_dtype: str = "float16", seed: int = 0, module: str = MODULE, names: dict[str, str] = STANDARD_NAMES,
) -> tuple[QuantConfig, dict[str, torch.Tensor]]:
    """A one-layer checkpoint (config, name -> tensor) with every width of `widths` in use."""
    g = torch.Generator().manual_seed(seed)
    decompositions, bits = {}, {}
    for p, R in zip(PROJECTIONS, ranks):
        if basis_dtype == "identity":
            basis = None  # R must be H
        else:
            basis = torch.linalg.qr(torch.randn(H, R, generator=g)).Q.T.contiguous()  # [R, H], orthonormal rows
        factors = torch.randn(E, R, I, generator=g) / I**0.5  # [E, R, I]
        decompositions[p] = Decomposition(basis, factors, torch.ones(R, dtype=torch.float64))
        choice = torch.randint(0, len(widths), (E, R), generator=g)
        bits[p] = torch.tensor(widths)[choice]  # [E, R]
    layout, tensors = encode_layer(
        module, decompositions, bits, group_size=G, basis_dtype=basis_dtype, projection_names=names
    )
    cfg = build_quant_config(
        [layout], bits=16.0, budget_scope="all", candidate_bits=tuple(sorted(set(widths) | {0})), group_size=G,
        basis_dtype=basis_dtype, activation="silu", hidden_size=H, intermediate_size=I, num_experts=E,
        projection_names=names,
    )
    return cfg, tensors
