"""The error feedback for experts that few tokens reach (offline.lowrank) against the dense path of offline.gptq on
the same Hessians H = Z^T Z, and against GPTQ as published: the same shares of the loss and the same rounding."""

import pytest
import torch

from bitsmoe_vllm.offline import gptq
from bitsmoe_vllm.offline.calibrate import Routed
from bitsmoe_vllm.offline.lowrank import Tokens, feedback, schur
from tests.test_gptq import G, nearest, output_error
from tests.test_quantize import layer_errors


def few_tokens(E: int = 4, n: int = 24, d: int = 300) -> torch.Tensor:
    """Z [E, n, d]: correlated inputs over more coordinates than one block of the feedback (lowrank.BLOCK); expert 1
    with fewer tokens (zero rows after), expert 2 with none, and a coordinate no token of expert 0 excites."""
    z = torch.randn(E, n, d) @ torch.randn(d, d) / d**0.5
    z[1, n // 2 :] = 0
    z[2] = 0
    z[0, :, 5] = 0
    return z


def tokens_of(z: torch.Tensor) -> Tokens:
    return Tokens(z, (z != 0).any(2).sum(1).tolist())


def dense(z: torch.Tensor) -> torch.Tensor:
    return z.transpose(1, 2) @ z


def test_compensation_is_the_dense_one():
    torch.manual_seed(0)
    z = few_tokens()
    got = gptq.compensation("gate", tokens_of(z))
    torch.testing.assert_close(got, gptq.compensation("gate", dense(z)), rtol=1e-5, atol=1e-6)
    assert got[0].min() < 0.5 and (got[2] == 1).all()  # correlated coordinates share; without tokens nothing to


def test_feedback_is_gptq_in_float64():
    """schur and feedback against GPTQ as published (U the upper Cholesky factor of H^-1, coordinate i's error
    d / U_ii moving each later coordinate j by -d U_ij / U_ii), in float64 with a plain rounding to a grid of 0.5: the
    same values, and c_j the Schur complement of the coordinates after j."""
    torch.manual_seed(1)
    n, d, rows = 24, 300, 16
    z = (torch.randn(1, n, d) @ torch.randn(d, d) / d**0.5).double()
    lam = torch.full((1, d), 0.01 * float(z.square().sum(1).mean()), dtype=torch.float64)
    w = torch.randn(1, rows, d, dtype=torch.float64)

    def grid(i, column):
        return torch.round(column * 2) / 2

    h = z[0].T @ z[0] + torch.diag(lam[0])
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    left, want = w[0].clone(), torch.zeros(rows, d, dtype=torch.float64)
    for i in range(d):
        want[:, i] = grid(i, left[:, i])
        left[:, i + 1 :] -= ((left[:, i] - want[:, i]) / u[i, i])[:, None] * u[i, i + 1 :]
    v, c = schur(z, lam)
    got = feedback(w.float(), z.float(), v, c, grid)[0]
    assert (got.double() == want).all()
    for i in (0, 150, d - 1):
        later = list(range(i + 1, d))
        complement = h[i, i] - (h[i, later] @ torch.linalg.solve(h[later][:, later], h[later, i]) if later else 0)
        assert float(c[0, i]) == pytest.approx(float(complement), rel=1e-9)


def test_round_factors_with_few_tokens():
    """Through round_factors: about what the dense path gives (whose float32 factorisation of H^-1, rank 24 of 300,
    moves values across rounding boundaries, and the feedback carries that on), far below rounding to nearest, and an
    expert without tokens rounded to nearest."""
    torch.manual_seed(1)
    z = few_tokens()
    E, _, d = z.shape
    factors, bits = torch.randn(E, d, 64), torch.randint(0, 5, (E, d))
    got, _ = gptq.round_factors("up", factors, bits, tokens_of(z), G, 8)
    want, _ = gptq.round_factors("up", factors, bits, dense(z), G, 8)
    h = dense(z)
    error = output_error("up", got - factors, h)
    assert abs(error - output_error("up", want - factors, h)) < 0.05 * error
    assert error < 0.01 * output_error("up", nearest(factors, bits) - factors, h)
    torch.testing.assert_close(got[2], nearest(factors[2:3], bits[2:3])[0], rtol=0, atol=0)


def test_hessians_hold_the_tokens_when_an_expert_has_few():
    torch.manual_seed(2)
    E, H, I, N = 4, 64, 16, 24
    x, ids, w = torch.randn(N, H), torch.randint(0, E, (N, 2)), torch.rand(N, 2)
    ids[:, 1] = (ids[:, 0] + 1) % E  # 12 tokens per expert on average: at most half of H, more than half of I
    assert I < torch.bincount(ids.flatten()).max() * 2 <= H
    weights = {p: torch.randn(E, I, H) for p in ("gate", "up", "down")}
    routed = Routed(x, ids, w)
    got = gptq.hessians(routed, weights, {"gate": None, "up": None})
    assert all(isinstance(got[p], Tokens) for p in ("gate", "up"))
    assert got["up"].tokens == torch.bincount(ids.flatten()).tolist()
    assert not isinstance(got["down"], Tokens)  # the down projection's I coordinates: fewer than twice the tokens
    for e in range(E):
        token, slot = (ids == e).nonzero(as_tuple=True)
        want = x[token].T @ torch.diag(w[token, slot] ** 2) @ x[token]
        torch.testing.assert_close(dense(got["up"].z)[e], want, rtol=1e-4, atol=1e-4)


def test_the_down_projection_with_few_tokens():
    """The down projection's share of the loss, its target (corrected: aimed at the expert's original output) and its
    rounding, from the tokens as from the dense H = Z^T Z and deviation D = Dev^T Z."""
    torch.manual_seed(3)
    z = few_tokens(d=256)
    E, n, d = z.shape
    deviation, tokens = torch.randn(E, n, d) * 0.1, torch.tensor([n, n // 2, 0, n])
    deviation[1, n // 2 :] = 0
    deviation[2] = 0
    torch.testing.assert_close(
        gptq.compensation("down", tokens_of(z)), gptq.compensation("down", dense(z)), rtol=1e-5, atol=1e-6
    )
    factors = torch.randn(E, 48, d)
    want = gptq.corrected(factors, dense(z), deviation.transpose(1, 2) @ z, tokens)
    torch.testing.assert_close(gptq.few_tokens_corrected(factors, z, deviation, tokens), want, rtol=1e-4, atol=1e-5)
    # an expert at a time on its own tokens (expert 2 has none): the batch's, padded with rows of zeros
    torch.testing.assert_close(
        gptq.few_tokens_fit(factors, tokens_of(z), deviation, tokens),
        gptq.few_tokens_corrected(factors, z, deviation, tokens),
        rtol=1e-5,
        atol=1e-6,
    )
    assert (want - factors).abs().max() > 0.01  # the target moved
    bits = torch.randint(1, 5, (E, 48))  # a dropped row (width 0) is dropped whatever the feedback
    got, _ = gptq.round_factors("down", factors, bits, tokens_of(z), G, 8, deviation=(deviation, tokens))
    dense_rounded, _ = gptq.round_factors(
        "down", factors, bits, dense(z), G, 8, deviation=(deviation.transpose(1, 2) @ z, tokens)
    )
    h = dense(z)
    error = output_error("down", got - want, h)
    assert abs(error - output_error("down", dense_rounded - want, h)) < 0.05 * error
    assert error < 0.3 * output_error("down", nearest(want, bits) - want, h)


def test_the_down_projections_target_from_the_tokens_where_its_rounding_is_dense():
    """Fewer tokens than coordinates but more than half as many: hessians keeps the down projection's tokens for the
    target's fit, and round_factors rounds on the dense H as from dense Hessians."""
    torch.manual_seed(4)
    E, H, I, N = 4, 64, 32, 44
    x, ids, w = torch.randn(N, H), torch.randint(0, E, (N, 2)), torch.rand(N, 2)
    ids[:, 1] = (ids[:, 0] + 1) % E
    assert I < torch.bincount(ids.flatten()).max() * 2 and torch.bincount(ids.flatten()).max() < I
    weights = {p: torch.randn(E, I, H) for p in ("gate", "up", "down")}
    rounded = {p: weights[p].transpose(1, 2) + 0.1 * torch.randn(E, H, I) for p in ("gate", "up")}
    got = gptq.hessians(Routed(x, ids, w), weights, {"gate": None, "up": None}, ("down",), rounded=rounded)
    z, deviation, tokens = got["down"].z, got["down-deviation"], got["down-tokens"]
    assert isinstance(got["down"], Tokens) and gptq.FEW * max(got["down"].tokens) > I
    factors, bits = weights["down"].transpose(1, 2).contiguous(), torch.randint(1, 5, (E, H))
    assert (gptq.few_tokens_corrected(factors, z, deviation, tokens) - factors).abs().max() > 0.01  # the target moved
    target = gptq.corrected(factors, dense(z), deviation.transpose(1, 2) @ z, tokens)
    from_tokens, _ = gptq.round_factors("down", factors, bits, got["down"], G, 8, deviation=(deviation, tokens))
    from_dense, _ = gptq.round_factors(
        "down", factors, bits, dense(z), G, 8, deviation=(deviation.transpose(1, 2) @ z, tokens)
    )
    h = dense(z)
    error = output_error("down", from_tokens - target, h)
    assert abs(error - output_error("down", from_dense - target, h)) < 0.05 * error
    assert error < 0.6 * output_error("down", nearest(target, bits) - target, h)  # measured 0.44: the feedback ran


def test_a_model_whose_experts_get_few_tokens(tiny_model_dir, quantize_tiny, calib_file, tmp_path, monkeypatch):
    """128 calibration tokens for 16 experts (top-2) with 128 coordinates in each projection: the busiest expert of
    one layer gets 57 (the path from the tokens), of the other 98 (the dense path for the rounding; the down
    projection's target from the tokens in both). The checkpoint's experts are as close to the original as with the
    dense factorisations everywhere (the two differ by float rounding)."""
    model = tiny_model_dir("qwen3_moe", layers=2, experts=16, intermediate=128, hidden=128)
    calls = []
    monkeypatch.setattr(gptq, "schur", lambda *args: calls.append(args[0].shape[1]) or schur(*args))
    few = quantize_tiny(model, tmp_path / "few", 2.5, calib_tokens=128, allow_high_error=True)
    assert calls
    monkeypatch.setattr(gptq, "FEW", 10**9)  # every batch dense
    monkeypatch.setattr(gptq, "FIT_FEW", 10**9)  # the down projection's target too
    calls.clear()
    dense_path = quantize_tiny(model, tmp_path / "dense", 2.5, calib_tokens=128, allow_high_error=True)
    assert not calls
    errors = [sum(layer_errors(model, d, calib_file).values()) for d in (few, dense_path)]
    assert abs(errors[0] - errors[1]) < 0.01 * errors[1], errors
