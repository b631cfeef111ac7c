"""offline.calibrate.ByExpert: a layer's routed tokens grouped by expert, with the inputs in a basis and the
pre-activations computed once for the cost model's passes, gives what each pass computed for itself, byte for byte."""

import pytest
import torch

from bitsmoe_vllm.offline import gptq
from bitsmoe_vllm.offline.calibrate import ByExpert, Routed, pre_activations
from bitsmoe_vllm.offline.cost import importance
from bitsmoe_vllm.offline.decompose import top_basis

E, I, H, N, K = 7, 32, 24, 50, 2


def layer(seed: int = 0, biases: bool = False):
    """Experts 2 and E - 1 never selected (a gap in the ids, and none after), int32 ids as some routers give."""
    g = torch.Generator().manual_seed(seed)
    weights = {p: torch.randn(E, I, H, generator=g).bfloat16() for p in ("gate", "up", "down")}
    if biases:
        weights |= {f"{p}_bias": torch.randn(E, I, generator=g) for p in ("gate", "up")}
    used = torch.tensor([e for e in range(E) if e not in (2, E - 1)])
    ids = torch.stack([used[torch.randperm(len(used), generator=g)[:K]] for _ in range(N)]).int()
    return weights, Routed(torch.randn(N, H, generator=g), ids, torch.rand(N, K, generator=g))


def test_tokens_inputs_and_pre_activations_are_each_experts_own():
    weights, routed = layer(biases=True)
    basis = top_basis(weights["gate"], H)[0]
    shared = ByExpert(routed, weights)
    assert shared.experts == [e for e in range(E) if e not in (2, E - 1)]
    assert shared.z(None) is shared.x and shared.z(basis) is shared.z(basis)  # the projection is computed once
    assert torch.equal(shared.z(basis), routed.x @ basis.T)
    for e in shared.experts:
        want_token, want_slot = (routed.ids == e).nonzero(as_tuple=True)
        token, slot = shared.tokens(e)
        assert torch.equal(token, want_token) and torch.equal(slot, want_slot)
        want = pre_activations(weights, e, routed.x[want_token])
        for _ in range(2):  # computed, then read back from the layer's buffer
            assert all(torch.equal(a, b) for a, b in zip(shared.pre(e), want, strict=True))


@pytest.mark.parametrize("identity", [False, True])
def test_the_cost_passes_give_the_same_bytes_with_one_shared_by_expert(identity):
    weights, routed = layer(1)
    bases = {p: None if identity else top_basis(weights[p], H)[0] for p in weights}
    shared = ByExpert(routed, weights)
    for p in ("gate", "up", "down"):
        for experts in (range(0, 3), range(3, E)):
            alone = importance(routed, weights, bases, N, (p,), experts)[p]
            assert torch.equal(importance(shared, weights, bases, N, (p,), experts)[p], alone)
            h_alone = gptq.hessians(routed, weights, bases, (p,), experts)[p]
            h_shared = gptq.hessians(shared, weights, bases, (p,), experts)[p]
            assert torch.equal(getattr(h_shared, "z", h_shared), getattr(h_alone, "z", h_alone))


def test_a_by_expert_of_other_weights_is_refused():
    weights, routed = layer(2)
    with pytest.raises(ValueError, match="same dict"):
        importance(ByExpert(routed, weights), dict(weights), {p: None for p in weights}, N)
