"""The cost model against its definition: the importance of a factor entry is the squared change of the MoE
output per unit change of that entry (first order), summed over the tokens routed to its expert."""

import pytest
import torch

from bitsmoe_vllm.offline.calibrate import Routed
from bitsmoe_vllm.offline.cost import importance, unit_losses
from bitsmoe_vllm.offline.decompose import project, top_basis

E, I, H, N, K = 4, 32, 24, 40, 2


def moe_output(x, w, factors: dict, bases: dict) -> torch.Tensor:
    """One expert's weighted output for tokens x [n, H] with routing weights w [n], from its factors [R, I]."""
    z_g, z_u = x @ bases["gate"].T, x @ bases["up"].T
    a = torch.nn.functional.silu(z_g @ factors["gate"]) * (z_u @ factors["up"])  # [n, I]
    return w[:, None] * (a @ factors["down"].T @ bases["down"])  # [n, H]; down basis [R, H] is U_d^T


@pytest.mark.parametrize("identity", [False, True])
def test_importance_is_the_first_order_output_change(identity):
    g = torch.Generator().manual_seed(0)
    weights = {
        p: torch.randn(E, I, H, generator=g) / H**0.5 for p in ("gate", "up", "down")
    }  # float32, as quantize gives
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    routed = Routed(torch.randn(N, H, generator=g), ids, torch.rand(N, K, generator=g))
    # full rank: the model linearises around the original weights (h_g, h_u, |D_e[:, i]|^2), which a cut rank changes
    bases = {p: None if identity else top_basis(weights[p], H)[0] for p in weights}
    got = importance(routed, weights, bases, n_tokens=N)
    assert got["gate"].shape == got["up"].shape == (E, H, I) and got["down"].shape == (E, 1, I)
    full = {p: torch.eye(H, dtype=torch.float64) if b is None else b.double() for p, b in bases.items()}
    e = 1
    token, slot = (ids == e).nonzero(as_tuple=True)
    x, w = routed.x[token].double(), routed.weights[token, slot].double()  # the measurement in float64
    factors = {p: project(weights[p], bases[p])[e].double() for p in weights}
    base_out, delta = moe_output(x, w, factors, full), 1e-6
    for p, (k, i) in (("gate", (3, 5)), ("up", (0, 17)), ("down", (7, 30))):
        moved = {**factors, p: factors[p].clone()}
        moved[p][k, i] += delta
        measured = ((moe_output(x, w, moved, full) - base_out) ** 2).sum() / delta**2 / N
        assert float(got[p][e, 0 if p == "down" else k, i]) == pytest.approx(float(measured), rel=1e-3), p


def test_unit_losses_at_zero_bits_are_the_weighted_energy_and_fall_with_width():
    g = torch.Generator().manual_seed(1)
    factors, weight = torch.randn(2, 8, 64, generator=g), torch.rand(2, 8, 64, generator=g)
    loss = unit_losses(factors, weight, [0, 2, 4, 8], unit_rows=4, group_size=32)  # [E, units, J]
    assert loss.shape == (2, 2, 4)
    torch.testing.assert_close(loss[..., 0], (factors**2 * weight).reshape(2, 2, 4, 64).sum((2, 3)).double())
    assert (loss[..., :-1] > loss[..., 1:]).all()


def test_an_expert_no_calibration_token_reached_gets_the_layers_prior():
    """As if it received its balanced share (N K / E) of the layer's tokens at the mean squared routing weight."""
    g = torch.Generator().manual_seed(2)
    weights = {p: torch.randn(E, I, H, generator=g) / H**0.5 for p in ("gate", "up", "down")}
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(N)])  # expert E - 1 never selected
    routed = Routed(torch.randn(N, H, generator=g), ids, torch.rand(N, K, generator=g))
    bases = {p: top_basis(weights[p], H)[0] for p in weights}
    got = importance(routed, weights, bases, n_tokens=N)
    everyone = Routed(
        routed.x, torch.full((N, 1), E - 1), torch.full((N, 1), float(routed.weights.pow(2).mean().sqrt()))
    )
    want = importance(everyone, weights, bases, n_tokens=N)
    for p in got:
        assert float(got[p][E - 1].min()) >= 0 and float(got[p][E - 1].sum()) > 0
        torch.testing.assert_close(got[p][E - 1], want[p][E - 1] * K / E)


def test_importance_of_a_batch_of_experts_is_that_slice_of_the_whole_layers():
    """The cost model takes a big layer's importance a projection and a batch of experts at a time (the whole layer's
    took GBs): the same values, prior included."""
    g = torch.Generator().manual_seed(3)
    weights = {p: torch.randn(E, I, H, generator=g) / H**0.5 for p in ("gate", "up", "down")}
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(N)])  # expert E - 1: the prior
    routed = Routed(torch.randn(N, H, generator=g), ids, torch.rand(N, K, generator=g))
    bases = {p: top_basis(weights[p], H // 2)[0] for p in weights}
    whole = importance(routed, weights, bases, n_tokens=N)
    for p in ("gate", "up", "down"):
        part = importance(routed, weights, bases, N, (p,), range(2, E))
        assert list(part) == [p]
        torch.testing.assert_close(part[p], whole[p][2:], rtol=0, atol=0)
