"""The CUDA kernels (csrc/cuda, bitsmoe_vllm/cuda.py) against the reference, and the repack against its loop
reference. Kernel tests need a CUDA device (they are skipped without one); the repack tests run anywhere."""

import pytest
import torch

from bitsmoe_vllm.cuda import TILE_M, prefill_tiles
from bitsmoe_vllm.format import READABLE_VERSIONS
from bitsmoe_vllm.kernel_layout import repack, repack_reference
from bitsmoe_vllm.reference import moe_forward
from tests.helpers import KERNEL_TOKENS, LAYERS, WIDTHS, layer_of

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not CUDA, reason="no CUDA device: the kernels are only compiled here (tests/test_kernel_build.py)"
)


def routing(T, E, K, seed, used):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(used, generator=g)[:K] for _ in range(T)])
    return torch.softmax(torch.randn(T, K, generator=g), -1), ids


@pytest.mark.parametrize("shape", LAYERS)
def test_repack_equals_its_reference(shape):
    layer = layer_of(shape)
    for p in ("gate", "up", "down"):
        got, want = repack(getattr(layer, p)), repack_reference(getattr(layer, p))
        for name in ("codes", "scales", "rows", "segs"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (p, name)
        assert got.segs[:, :, 1].sum() == (getattr(layer, p).bits > 0).sum()


@pytest.mark.parametrize("T, K, E", [(1, 2, 4), (65, 3, 5), (222, 8, 16), (300, 2, 3)])
def test_prefill_tiles_cover_every_routed_slot_once(T, K, E):
    _, ids = routing(T, E, K, seed=T, used=E - 1 if E > K else E)
    ids[0, 0] = -1  # held elsewhere: in no tile
    slots, expert, start, count = prefill_tiles(ids, E)
    assert len(expert) == -(-T * K // TILE_M) + E
    flat, seen = ids.flatten(), []
    for t in range(len(expert)):
        if expert[t] < 0:
            continue
        tile = slots[start[t] : start[t] + count[t]].long()
        assert 0 < count[t] <= TILE_M and (flat[tile] == expert[t]).all()
        seen += tile.tolist()
    assert sorted(seen) == (flat >= 0).nonzero().flatten().tolist()


def relative_error(y, ref) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


@pytest.fixture(scope="module")
def cuda_ops():
    from bitsmoe_vllm.cuda import load_kernels, moe_forward_cuda, to_kernel_layer

    assert load_kernels(build=True)
    return to_kernel_layer, moe_forward_cuda


# relative L2 error: decode computes in float32 (only the output is rounded); prefill rounds z, the decoded factors and
# the activations to the 16-bit type for the tensor cores
TOLERANCE = {
    ("decode", torch.float32): 1e-5,
    ("decode", torch.bfloat16): 1e-2,
    ("decode", torch.float16): 2e-3,
    ("prefill", torch.bfloat16): 2e-2,
    ("prefill", torch.float16): 5e-3,
}


@needs_cuda
@pytest.mark.parametrize("shape", LAYERS, ids=lambda s: f"H{s[0]}-I{s[1]}-E{s[2]}")
@pytest.mark.parametrize("T", KERNEL_TOKENS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_kernel_matches_reference_mixed_widths(cuda_ops, shape, T, dtype, path):
    to_kernel_layer, moe_forward_cuda = cuda_ops
    H, I, E, K, _, _ = shape
    layer = layer_of(shape, seed=T).to(torch.device("cuda"))
    w, ids = routing(T, E, K, seed=T, used=E - 1)  # the last expert gets no tokens
    x = torch.randn(T, H).to(dtype)
    ref = moe_forward(x.float().cuda(), w.cuda(), ids.cuda(), layer)
    y = moe_forward_cuda(x.cuda(), w.to(dtype).cuda(), ids.cuda(), to_kernel_layer(layer), path=path)
    assert y.dtype == dtype and y.shape == (T, H) and torch.isfinite(y).all()
    assert relative_error(y, ref) < TOLERANCE[path, dtype]


@needs_cuda
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("basis_dtype", ["float16", "int8", "identity"])
@pytest.mark.parametrize("path, dtype", [("decode", torch.float32), ("prefill", torch.bfloat16)])
@pytest.mark.parametrize("version", READABLE_VERSIONS)
def test_kernel_every_width_and_basis(cuda_ops, width, basis_dtype, path, dtype, version):
    to_kernel_layer, moe_forward_cuda = cuda_ops
    shape = LAYERS[1]
    H, I, E, K, _, _ = shape
    layer = layer_of(shape, widths=(width,), basis_dtype=basis_dtype, format_version=version).to(torch.device("cuda"))
    w, ids = routing(17, E, K, seed=width, used=E)
    ids[3, 1] = -1  # a choice held by another expert-parallel rank
    x = torch.randn(17, H, device="cuda").to(dtype)
    ref = moe_forward(x.float(), w.cuda(), ids.cuda(), layer)
    y = moe_forward_cuda(x, w.cuda(), ids.cuda(), to_kernel_layer(layer), path=path)
    assert relative_error(y, ref) < TOLERANCE[path, dtype]


@needs_cuda
@pytest.mark.parametrize("path, dtype", [("decode", torch.float32), ("prefill", torch.bfloat16)])
def test_kernel_runs_gpt_oss_biases_and_activation(cuda_ops, path, dtype):
    """Expert biases and swigluoai (a limit of 1.5, clamping many entries): gate/up biases and the activation in the
    kernels, the down bias after the shared basis."""
    to_kernel_layer, moe_forward_cuda = cuda_ops
    H, I, E, K, _, _ = LAYERS[1]
    layer = layer_of(LAYERS[1], seed=7, gpt_oss=True).to(torch.device("cuda"))
    w, ids = routing(222, E, K, seed=7, used=E)
    ids[3, 1] = -1  # a choice held by another expert-parallel rank: neither its output nor its bias
    x = torch.randn(222, H, device="cuda").to(dtype)
    ref = moe_forward(x.float(), w.cuda(), ids.cuda(), layer)
    y = moe_forward_cuda(x, w.cuda(), ids.cuda(), to_kernel_layer(layer), path=path)
    assert relative_error(y, ref) < TOLERANCE[path, dtype]


@needs_cuda
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_kernel_is_deterministic_and_captures_in_a_cuda_graph(cuda_ops, path):
    to_kernel_layer, moe_forward_cuda = cuda_ops
    H, I, E, K, _, _ = LAYERS[0]
    kernel = to_kernel_layer(layer_of(LAYERS[0]).to(torch.device("cuda")))
    w, ids = (t.cuda() for t in routing(65, E, K, seed=1, used=E))
    x = torch.randn(65, H, device="cuda", dtype=torch.bfloat16)
    eager = moe_forward_cuda(x, w, ids, kernel, path=path)
    assert torch.equal(eager, moe_forward_cuda(x, w, ids, kernel, path=path))  # no float atomics: bit-identical reruns
    static_x = x.clone()
    moe_forward_cuda(static_x, w, ids, kernel, path=path)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = moe_forward_cuda(static_x, w, ids, kernel, path=path)
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(static_y, moe_forward_cuda(static_x, w, ids, kernel, path=path))


@needs_cuda
def test_opcheck(cuda_ops):
    to_kernel_layer, _ = cuda_ops
    H, I, E, K, ranks, G = LAYERS[1]
    k = to_kernel_layer(layer_of(LAYERS[1]).to(torch.device("cuda")))
    w, ids = routing(5, E, K, seed=2, used=E)
    z_g, z_u = torch.randn(5, ranks[0], device="cuda"), torch.randn(5, ranks[1], device="cuda")
    factors = [getattr(f, n) for f in (k.gate, k.up, k.down) for n in ("codes", "scales", "rows", "segs")]
    args = (z_g, z_u, ids.cuda(), factors, k.down.rank, G, k.odd_codes)
    torch.library.opcheck(torch.ops.bitsmoe.moe_decode.default, args)
    args = (
        z_g.bfloat16(),
        z_u.bfloat16(),
        ids.cuda(),
        *prefill_tiles(ids.cuda(), E),
        factors,
        k.down.rank,
        G,
        k.odd_codes,
    )
    torch.library.opcheck(torch.ops.bitsmoe.moe_prefill.default, args)
