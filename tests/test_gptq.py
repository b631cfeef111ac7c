"""Error feedback (offline.gptq) against the math: no tokens is rounding to nearest, the second coordinate absorbs
the first one's error as the least-squares solution says, and the expected output error falls."""

import pytest
import torch

from bitsmoe_vllm.offline import gptq
from bitsmoe_vllm.offline.calibrate import Routed
from bitsmoe_vllm.offline.rounding import quantize_rows

G = 32


def nearest(factors: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(factors)
    for e in range(factors.shape[0]):
        for k in range(factors.shape[1]):
            if bits[e, k]:
                codes, scales = quantize_rows(factors[e, k][None], int(bits[e, k]), G)
                out[e, k] = (codes.float() * scales.float().repeat_interleave(G, dim=1))[0]
    return out


def random_routing(N: int, H: int, E: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N random tokens [N, H], each routed to two distinct experts of E with random weights."""
    x, ids, w = torch.randn(N, H), torch.randint(0, E, (N, 2)), torch.rand(N, 2)
    ids[:, 1] = (ids[:, 0] + 1) % E
    return x, ids, w


def output_error(projection: str, delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """sum_e of the squared output error on the Hessian's tokens; the coordinates: rank rows (gate, up) or columns."""
    d = delta if projection == "down" else delta.transpose(1, 2)
    return float(torch.einsum("eri,eij,erj->", d, hessian, d))


@pytest.mark.parametrize("projection", ["gate", "down"])
def test_without_tokens_it_is_rounding_to_nearest(projection):
    torch.manual_seed(0)
    factors, bits = torch.randn(3, 8, 64), torch.randint(0, 5, (3, 8))
    rounded, scales = gptq.round_factors(
        projection, factors, bits, torch.zeros(3, *(2 * (64 if projection == "down" else 8,))), G, 8
    )
    torch.testing.assert_close(rounded, nearest(factors, bits), rtol=0, atol=0)
    assert (scales[bits == 0] == 0).all() and (scales[bits > 0] > 0).all()


def test_the_next_rank_row_absorbs_the_error_by_least_squares():
    """Two rank rows (gate/up): after row 0 is rounded with error d, the output error d H00 d + 2 d H01 x + x H11 x over
    row 1's change x is least at x = -d H01 / H11 (H damped as GPTQ damps it), and row 1 is then rounded from there."""
    torch.manual_seed(1)
    factors, bits = torch.randn(1, 2, 64), torch.tensor([[2, 3]])
    u = torch.randn(500, 2) @ torch.tensor([[1.0, 0.8], [0.0, 0.6]])
    hessian = (u.T @ u)[None]
    rounded, _ = gptq.round_factors("gate", factors, bits, hessian, G, 8)
    d = rounded[0, 0] - factors[0, 0]
    h = hessian[0] + gptq.DAMP * hessian[0].diagonal().mean() * torch.eye(2)
    moved = factors[0, 1] - d * h[0, 1] / h[1, 1]
    torch.testing.assert_close(rounded[0, 1], nearest(moved[None, None], bits[:, 1:])[0, 0], rtol=0, atol=1e-6)


def test_a_dropped_rank_row_goes_first_and_the_wider_row_absorbs_it():
    """Row 1 has width 0, so it is rounded first whatever its rank: its whole value d = F[1] is the error, and row 0
    is rounded from F[0] + d H10 / H00."""
    torch.manual_seed(4)
    factors, bits = torch.randn(1, 2, 64), torch.tensor([[3, 0]])
    u = torch.randn(500, 2) @ torch.tensor([[1.0, 0.7], [0.0, 0.7]])
    hessian = (u.T @ u)[None]
    rounded, _ = gptq.round_factors("up", factors, bits, hessian, G, 8)
    h = hessian[0] + gptq.DAMP * hessian[0].diagonal().mean() * torch.eye(2)
    moved = factors[0, 0] + factors[0, 1] * h[1, 0] / h[0, 0]
    assert (rounded[0, 1] == 0).all()
    torch.testing.assert_close(rounded[0, 0], nearest(moved[None, None], bits[:, :1])[0, 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("projection", ["gate", "up", "down"])
def test_correlated_inputs_cost_less_than_rounding_to_nearest(projection):
    torch.manual_seed(2)
    E, R, I = 4, 48, 96
    n = I if projection == "down" else R
    u = torch.randn(4000, n) @ torch.randn(n, n)
    hessian = torch.stack([(u[e::E].T @ u[e::E]) for e in range(E)])
    factors, bits = torch.randn(E, R, I), torch.randint(1, 5, (E, R))
    bits[:, -4:] = 0  # dropped rows: their whole energy is an error to compensate
    rounded, _ = gptq.round_factors(projection, factors, bits, hessian, G, 8)
    assert output_error(projection, rounded - factors, hessian) < 0.9 * output_error(
        projection, nearest(factors, bits) - factors, hessian
    )


def test_hessians_are_the_routed_tokens_second_moments_in_rank_space():
    torch.manual_seed(3)
    E, H, I, N = 3, 16, 32, 50
    x, ids, w = random_routing(N, H, E)
    weights = {p: torch.randn(E, I, H) for p in ("gate", "up", "down")}
    basis = torch.linalg.qr(torch.randn(H, H))[0][:8]  # [R, H]
    got = gptq.hessians(Routed(x, ids, w), weights, {"gate": basis, "up": None})
    for e in range(E):
        token, slot = (ids == e).nonzero(as_tuple=True)
        xe, w2 = x[token], w[token, slot] ** 2
        a = torch.nn.functional.silu(xe @ weights["gate"][e].T) * (xe @ weights["up"][e].T)
        want = {
            "gate": (xe @ basis.T).T @ torch.diag(w2) @ (xe @ basis.T),
            "up": xe.T @ torch.diag(w2) @ xe,
            "down": a.T @ torch.diag(w2) @ a,
        }
        for p, m in want.items():
            torch.testing.assert_close(got[p][e], m, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("projection", ["up", "down"])
def test_compensation_is_the_schur_complement_of_the_coordinates_rounded_later(projection):
    """The share of coordinate i's loss the feedback leaves: (H_ii - H_iF H_FF^-1 H_Fi) / H_ii over the coordinates F
    rounded after it (H damped), in the cost model's order: rank rows by ascending H_ii, down columns descending."""
    torch.manual_seed(5)
    n = 6
    u = torch.randn(300, n) @ torch.randn(n, n)
    hessian = torch.stack([u.T @ u, torch.diag(torch.rand(n) + 0.5)]).double()
    got = gptq.compensation(projection, hessian)
    for e in range(2):
        h = hessian[e] + gptq.DAMP * hessian[e].diagonal().mean() * torch.eye(n, dtype=torch.float64)
        order = h.diagonal().argsort(descending=projection == "down").tolist()
        for pos, i in enumerate(order):
            later = order[pos + 1 :]
            schur = h[i, i] - h[i, later] @ torch.linalg.solve(h[later][:, later], h[later, i]) if later else h[i, i]
            assert got[e, i].item() == pytest.approx(float(schur / h[i, i]), rel=1e-4)
    assert (got[1] == 1).all()  # uncorrelated coordinates: nothing to compensate with
    assert got[0].min() < 0.5  # correlated ones: the first rounded keeps only a part of its loss


def test_factorisations_in_batches_of_experts_give_the_same_values(monkeypatch):
    """compensation and inverse_cholesky factorise a few experts at a time (a big layer's all at once ran out of
    memory): every expert's values are those of the whole batch"""
    x = torch.randn(5, 40, 12, generator=torch.Generator().manual_seed(0))
    h = x.transpose(1, 2) @ x  # [5, 12, 12]
    whole = [gptq.inverse_cholesky(h), gptq.compensation("gate", h), gptq.compensation("down", h)]
    monkeypatch.setattr(gptq, "FACTOR_BYTES", 2 * 8 * 12 * 12)  # 2 experts a batch, the last alone
    batched = [gptq.inverse_cholesky(h), gptq.compensation("gate", h), gptq.compensation("down", h)]
    assert all(torch.equal(a, b) for a, b in zip(whole, batched))
    sizes = []  # the largest operand sets the batch: factors [5, 24, 12] twice a Hessian's size, one expert a batch
    gptq.by_experts(lambda a, b: sizes.append(len(a)) or a, h, torch.zeros(5, 24, 12))
    assert sizes == [1] * 5


def test_inverse_cholesky_is_the_upper_factor_of_the_damped_hessians_inverse():
    x = torch.randn(3, 30, 10, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    h = x.transpose(1, 2) @ x
    h[2, 4, :], h[2, :, 4] = 0, 0  # a coordinate no token excited
    u = gptq.inverse_cholesky(h).double()
    assert torch.equal(u, u.triu()) and (u.diagonal(dim1=1, dim2=2) > 0).all()
    torch.testing.assert_close(u.transpose(1, 2) @ u, torch.linalg.inv(gptq.damped(h)), rtol=1e-4, atol=1e-6)


def test_experts_in_batches_give_the_hessians_and_rounding_of_the_whole_layer(monkeypatch):
    """The quantizer handles a layer's experts a batch at a time (their Hessians took 2 GB per projection of a
    Qwen3-30B-A3B layer): each expert's values are those of the whole layer."""
    torch.manual_seed(7)
    E, H, I, N = 5, 16, 64, 80
    x, ids, w = random_routing(N, H, E)
    routed, weights = Routed(x, ids, w), {p: torch.randn(E, I, H) for p in ("gate", "up", "down")}
    bases = {"gate": torch.linalg.qr(torch.randn(H, H))[0][:8], "up": None}
    factors, bits = torch.randn(E, 8, I), torch.randint(0, 5, (E, 8))
    whole_h = gptq.hessians(routed, weights, bases, ("gate",))["gate"]
    whole = gptq.round_factors("gate", factors, bits, whole_h.clone(), G, 8)
    monkeypatch.setattr(gptq, "FACTOR_BATCH_BYTES", 3 * 4 * H * I)  # three experts' factors (<= H rows) a batch
    assert gptq.expert_batches(weights, bases, "gate") == [range(0, 3), range(3, 5)]
    monkeypatch.setattr(gptq, "HESSIAN_BYTES", 2 * 4 * 8 * 8)  # two experts' Hessians of rank 8 a batch
    batches = gptq.expert_batches(weights, bases, "gate")
    assert batches == [range(0, 2), range(2, 4), range(4, 5)]
    hs = [gptq.hessians(routed, weights, bases, ("gate",), b)["gate"] for b in batches]
    assert torch.equal(torch.cat(hs), whole_h)
    parts = [
        gptq.round_factors("gate", factors[b.start : b.stop], bits[b.start : b.stop], h, G, 8)
        for b, h in zip(batches, hs)
    ]
    assert torch.equal(torch.cat([f for f, _ in parts]), whole[0])
    assert torch.equal(torch.cat([s for _, s in parts]), whole[1])


def test_the_down_inputs_of_the_rounded_gate_and_up_and_their_deviation():
    """With the rounded gate and up factors, the down projection's inputs u are theirs (in rank space) and the
    deviation is sum w^2 (a - u) u^T per expert, a the original gate and up's inputs to it."""
    torch.manual_seed(8)
    E, H, I, N = 3, 16, 32, 60
    x, ids, w = random_routing(N, H, E)
    weights = {p: torch.randn(E, I, H) for p in ("gate", "up", "down")}
    basis = torch.linalg.qr(torch.randn(H, H))[0][:8]  # [R, H]
    rounded = {"gate": torch.randn(E, 8, I), "up": torch.randn(E, H, I)}
    got = gptq.hessians(Routed(x, ids, w), weights, {"gate": basis, "up": None}, ("down",), rounded=rounded)
    assert set(got) == {"down", "down-deviation", "down-tokens"}
    silu = torch.nn.functional.silu
    for e in range(E):
        token, slot = (ids == e).nonzero(as_tuple=True)
        xe, w2 = x[token], torch.diag(w[token, slot] ** 2)
        u = silu(xe @ basis.T @ rounded["gate"][e]) * (xe @ rounded["up"][e])
        a = silu(xe @ weights["gate"][e].T) * (xe @ weights["up"][e].T)
        torch.testing.assert_close(got["down"][e], u.T @ w2 @ u, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(got["down-deviation"][e], (a - u).T @ w2 @ u, rtol=1e-4, atol=1e-3)
        assert got["down-tokens"][e] == len(token)


def test_the_down_target_is_the_least_squares_fit_of_the_original_outputs():
    """corrected: the factors F* minimising sum |F* u - F a|^2 + lambda |F* - F|^2 (lambda: GPTQ's damping plus
    mean(H_ii) I / n, so no tokens, no change), solved here by least squares on the tokens; round_factors with the
    deviation rounds from them."""
    torch.manual_seed(9)
    E, R, I, N = 2, 8, 64, 400
    u = torch.randn(E, N, I, dtype=torch.float64) @ torch.randn(I, I, dtype=torch.float64)
    a = u + 0.3 * torch.randn(E, N, I, dtype=torch.float64)
    hessian, deviation = u.transpose(1, 2) @ u, (a - u).transpose(1, 2) @ u
    factors, tokens = torch.randn(E, R, I), torch.tensor([N, N / 4])  # the second: weights as if of fewer tokens
    got = gptq.corrected(factors, hessian, deviation, tokens)
    for e in range(E):
        f, mean = factors[e].double(), hessian[e].diagonal().mean()
        damp = gptq.DAMP * mean + mean * I / tokens[e]
        lhs = torch.cat([u[e], damp.sqrt() * torch.eye(I, dtype=torch.float64)])  # [N + I, I]
        rhs = torch.cat([a[e] @ f.T, damp.sqrt() * f.T])
        torch.testing.assert_close(got[e].double(), torch.linalg.lstsq(lhs, rhs).solution.T, rtol=1e-4, atol=1e-4)
    bits = torch.randint(0, 5, (E, R))
    args = (bits, hessian.float(), G, 8)
    direct = gptq.round_factors("down", got, *args)
    via = gptq.round_factors("down", factors, *args, deviation=(deviation.float(), tokens))
    assert all(torch.equal(x, y) for x, y in zip(direct, via))
