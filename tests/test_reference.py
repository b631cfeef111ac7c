"""The reference forward against the dense MoE written from the math, on random packed layers."""

import pytest
import torch

from bitsmoe_vllm.activation import SILU, Activation
from bitsmoe_vllm.offline.encode import encode_factor
from bitsmoe_vllm.offline.rounding import quantize_rows
from bitsmoe_vllm.reference import (
    MoELayer,
    dequantize_basis,
    dequantize_factor,
    expert_factor,
    expert_factors,
    gather_layer,
    moe_forward,
)
from tests.helpers import ACT_DTYPES, LAYERS, MODULE, TOKENS, WIDTHS, random_checkpoint, routing


def dense_moe(x, topk_weights, topk_ids, layer: MoELayer) -> torch.Tensor:
    """y = sum_k w_k D_e (silu(G_e x) * U_e x) with G_e = F_g^T B_g, U_e = F_u^T B_u, D_e = B_d F_d."""
    H = x.shape[1]
    B_g, B_u, B_d = (
        torch.eye(H) if b is None else dequantize_basis(b) for b in (layer.gate_basis, layer.up_basis, layer.down_basis)
    )
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for w, e in zip(topk_weights[t].tolist(), topk_ids[t].tolist()):
            if e < 0:
                continue
            G, U, D = ((expert_factor(f, e, layer.group_size)) for f in (layer.gate, layer.up, layer.down))
            G_e, U_e, D_e = (G.T @ B_g).double(), (U.T @ B_u).double(), (B_d @ D).double()
            xt = x[t].double()
            y[t] += w * (D_e @ (torch.nn.functional.silu(G_e @ xt) * (U_e @ xt)))
    return y


@pytest.mark.parametrize("shape", LAYERS, ids=lambda s: f"H{s[0]}-I{s[1]}-E{s[2]}-K{s[3]}-R{'.'.join(map(str, s[4]))}")
@pytest.mark.parametrize("T", TOKENS)
def test_forward_matches_dense_math_with_mixed_widths(shape, T):
    H, I, E, K, ranks, G = shape
    cfg, tensors = random_checkpoint(H, I, E, ranks, G, seed=T)
    layer = gather_layer(cfg, MODULE, tensors)
    assert set(layer.gate.bits.unique().tolist()) == {0, *WIDTHS}  # every width, 0 included, in one layer
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(1))
    w, ids = routing(T, E, K, seed=T, used_experts=E - 1)  # the last expert gets no tokens
    expected = dense_moe(x, w, ids, layer)
    torch.testing.assert_close(moe_forward(x, w, ids, layer).double(), expected, rtol=1e-4, atol=1e-5)
    # the factors dequantized once (evaluation's path) give the same output, bit for bit
    assert torch.equal(moe_forward(x, w, ids, layer, expert_factors(layer)), moe_forward(x, w, ids, layer))


@pytest.mark.parametrize("dtype", ACT_DTYPES)
def test_activation_dtypes(dtype):
    H, I, E, K, ranks, G = LAYERS[1]
    cfg, tensors = random_checkpoint(H, I, E, ranks, G)
    layer = gather_layer(cfg, MODULE, tensors)
    x = torch.randn(17, H).to(dtype)
    w, ids = routing(17, E, K, seed=0)
    y = moe_forward(x, w.to(dtype), ids, layer)
    assert y.dtype == dtype and y.shape == (17, H)
    expected = dense_moe(x.float(), w.to(dtype).float(), ids, layer).to(dtype)
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol)


def test_int8_bases():
    H, I, E, K, ranks, G = LAYERS[0]
    cfg, tensors = random_checkpoint(H, I, E, ranks, G, basis_dtype="int8")
    layer = gather_layer(cfg, MODULE, tensors)
    assert layer.gate_basis.weight.dtype == torch.int8 and layer.gate_basis.scale.shape == (ranks[0],)
    x = torch.randn(3, H)
    w, ids = routing(3, E, K, seed=3)
    torch.testing.assert_close(
        moe_forward(x, w, ids, layer).double(), dense_moe(x, w, ids, layer), rtol=1e-4, atol=1e-5
    )


def test_identity_bases():
    H, I, E, K, _, G = LAYERS[0]
    cfg, tensors = random_checkpoint(H, I, E, (H, H, H), G, basis_dtype="identity")
    layer = gather_layer(cfg, MODULE, tensors)
    assert layer.gate_basis is layer.up_basis is layer.down_basis is None
    assert not any(name.endswith((".basis", ".basis_scale")) for name in tensors)
    x = torch.randn(9, H)
    w, ids = routing(9, E, K, seed=9)
    torch.testing.assert_close(
        moe_forward(x, w, ids, layer).double(), dense_moe(x, w, ids, layer), rtol=1e-4, atol=1e-5
    )


def test_negative_ids_and_unrouted_tokens_contribute_nothing():
    H, I, E, K, ranks, G = LAYERS[0]
    cfg, tensors = random_checkpoint(H, I, E, ranks, G)
    layer = gather_layer(cfg, MODULE, tensors)
    x = torch.randn(5, H)
    w, ids = routing(5, E, K, seed=5)
    ids_ep = ids.clone()
    ids_ep[:, 1] = -1  # second choice held by another expert-parallel rank
    ids_ep[4, :] = -1  # a token with no local expert
    y = moe_forward(x, w, ids_ep, layer)
    assert torch.equal(y[4], torch.zeros(H))
    torch.testing.assert_close(y, moe_forward(x, w[:, :1], ids[:, :1], layer).masked_fill(ids_ep[:, :1] < 0, 0))


@pytest.mark.parametrize("bits_pattern", [[2, 0, 1, 3], [8, 8, 0, 0], [0, 0, 0, 0], [6, 4, 3, 2, 1, 0, 8]])
def test_dequantize_factor_follows_the_row_layout(bits_pattern):
    """Each stored row dequantizes to what rounding that row alone gives (FORMAT.md section 3)."""
    R, I, G = len(bits_pattern), 96, 32
    factor = torch.randn(R, I, generator=torch.Generator().manual_seed(R))
    bits = torch.tensor(bits_pattern, dtype=torch.uint8)
    codes, scales = encode_factor(factor, bits, G)
    assert codes.shape == (sum(bits_pattern), I // 32) and scales.shape == (sum(b > 0 for b in bits_pattern), I // G)
    got = dequantize_factor(codes, scales, bits, G)
    for k, b in enumerate(bits_pattern):
        if b == 0:
            assert torch.equal(got[k], torch.zeros(I))
        else:
            q, s = quantize_rows(factor[k : k + 1], b, G)
            assert torch.equal(got[k], (q.float() * s.float().repeat_interleave(G, 1))[0])


def test_dequantize_factor_rejects_non_uint8_bits():
    with pytest.raises(ValueError, match="bits must be uint8"):
        dequantize_factor(torch.zeros(2, 1, dtype=torch.int32), torch.zeros(1, 1).half(), torch.tensor([2, 0]), 32)


def test_dequantize_factor_rejects_codes_that_do_not_match_bits():
    bits = torch.tensor([2, 0, 3], dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"bits ask for 5 planes and 2 scale rows, found codes \[4, 1\]"):
        dequantize_factor(torch.zeros(4, 1, dtype=torch.int32), torch.zeros(2, 1).half(), bits, 32)


def swigluoai(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's activation as its reference implementation writes it."""
    gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def test_biases_and_gpt_oss_activation_match_the_dense_math():
    H, I, E, K, ranks, G = LAYERS[0]
    cfg, tensors = random_checkpoint(H, I, E, ranks, G, gpt_oss=True)
    layer = gather_layer(cfg, MODULE, tensors)
    assert layer.biases.gate.shape == (E, I) and layer.biases.down.shape == (E, H)
    x, (w, ids) = torch.randn(11, H, generator=torch.Generator().manual_seed(4)), routing(11, E, K, seed=4)
    B_g, B_u, B_d = (dequantize_basis(b).double() for b in (layer.gate_basis, layer.up_basis, layer.down_basis))
    expected = torch.zeros(11, H, dtype=torch.float64)
    for t in range(11):
        for weight, e in zip(w[t].tolist(), ids[t].tolist()):
            G_e, U_e, D_e = (expert_factor(f, e, G).double() for f in (layer.gate, layer.up, layer.down))
            xt = x[t].double()
            h_gate = G_e.T @ (B_g @ xt) + layer.biases.gate[e].double()
            h_up = U_e.T @ (B_u @ xt) + layer.biases.up[e].double()
            expected[t] += weight * (B_d @ (D_e @ swigluoai(h_gate, h_up, 1.702, 1.5)) + layer.biases.down[e].double())
    clamped = (B_g @ x.double().T).T @ expert_factor(layer.gate, 0, G).double() + layer.biases.gate[0].double() > 1.5
    assert clamped.any() and not clamped.all()  # the limit is in play
    torch.testing.assert_close(moe_forward(x, w, ids, layer).double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", [SILU, Activation("swigluoai", 1.702, 1.5)], ids=["silu", "swigluoai"])
def test_activation_derivatives_are_autograds(activation):
    gate, up = (torch.randn(500, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) * 3 for s in (0, 1))
    d_gate, d_up = torch.autograd.functional.jacobian(lambda g, u: activation(g, u), (gate, up))
    expected = d_gate.diagonal(), d_up.diagonal()
    for found, wanted in zip(activation.derivatives(gate, up), expected):
        torch.testing.assert_close(found, wanted)
    if activation.name == "swigluoai":
        torch.testing.assert_close(activation(gate, up), swigluoai(gate, up, 1.702, 1.5))
        assert (expected[1] == 0).any() and (expected[0] == 0).any()  # clamped entries: no gradient


def test_the_forward_does_not_depend_on_torchs_default_dtype(monkeypatch):
    """vLLM builds a model (and runs the oracle's check at load) with torch's default dtype set to the model's."""
    H, I, E, K, ranks, G = LAYERS[0]
    cfg, tensors = random_checkpoint(H, I, E, ranks, G, gpt_oss=True)
    layer = gather_layer(cfg, MODULE, tensors)
    x, (w, ids) = torch.randn(6, H).bfloat16(), routing(6, E, K, seed=6)
    expected = moe_forward(x, w.bfloat16(), ids, layer)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        assert torch.equal(moe_forward(x, w.bfloat16(), ids, layer), expected)
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize("basis_dtype", ["int8", "float16"])
def test_one_basis_per_layer_serves_gate_and_up_as_stored_and_down_transposed(basis_dtype):
    """basis_sharing "layer": with C the stored basis [R, H], s its row scales and t down's one scale (int8; else
    s = t = 1), G_e = F_g^T diag(s) C, U_e = F_u^T diag(s) C and D_e = t C^T F_d, from the stored tensors alone."""
    H, I, E, R, G = 48, 64, 5, 40, 32
    cfg, tensors = random_checkpoint(H, I, E, (R, R, R), G, basis_dtype=basis_dtype, basis_sharing="layer")
    layer = gather_layer(cfg, MODULE, tensors)
    C = tensors[f"{MODULE}.0.gate_proj.basis"].double()
    V, B_d = C, C.T
    if basis_dtype == "int8":
        V = C * tensors[f"{MODULE}.0.gate_proj.basis_scale"].double()[:, None]
        B_d = C.T * float(tensors[f"{MODULE}.0.down_proj.basis_scale"])
    x = torch.randn(7, H, dtype=torch.float64)
    topk_weights, topk_ids = routing(7, E, 2, seed=3)
    y = torch.zeros_like(x)
    for t in range(7):
        for w, e in zip(topk_weights[t].tolist(), topk_ids[t].tolist()):
            F_g, F_u, F_d = (expert_factor(f, e, G).double() for f in (layer.gate, layer.up, layer.down))
            y[t] += w * ((B_d @ F_d) @ (torch.nn.functional.silu(F_g.T @ V @ x[t]) * (F_u.T @ V @ x[t])))
    ours = moe_forward(x.float(), topk_weights, topk_ids, layer).double()
    assert (ours - y).norm() / y.norm() < 1e-5
