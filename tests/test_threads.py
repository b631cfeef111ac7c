"""--workers gives each process a share of the threads; the float work whose bits depend on the thread count runs on
the count the quantizer started with (offline/threads.py), so a worker computes what one process does."""

import pytest
import torch

from bitsmoe_vllm.offline import gptq, threads
from bitsmoe_vllm.offline.decompose import top_basis
from bitsmoe_vllm.offline.lowrank import Tokens


@pytest.fixture
def as_worker():
    """as_worker(fn): fn() in a process started on 2 threads, once on all of them (one process) and once on one of
    them (a worker of --workers 2)."""
    start, current = threads.start_threads(), torch.get_num_threads()
    threads.set_start_threads(2)

    def run(fn):
        out = []
        for n in (2, 1):
            torch.set_num_threads(n)
            out.append(fn())
        return out

    yield run
    threads.set_start_threads(start)
    torch.set_num_threads(current)


def test_the_shared_basis_is_the_same_in_a_worker(as_worker):
    # MKL's eigh of a 256 x 256 gram splits its work by thread: the energies differ in the last bits otherwise
    weights = torch.randn(8, 128, 256, generator=torch.Generator().manual_seed(0))
    main, worker = as_worker(lambda: top_basis(weights, 256))
    assert torch.equal(main[0], worker[0]) and torch.equal(main[1], worker[1])


@pytest.mark.parametrize("fn", ["inverse_cholesky", "compensation", "corrected"])
def test_the_error_feedback_is_the_same_in_a_worker(fn, as_worker):
    # a batch of 4 experts' 512 x 512 Hessians with 256 rank rows (MKL's batched LU failed on two threads at this
    # shape on a 2-core AMD EPYC: "Intel oneMKL ERROR: Parameter 6 was incorrect on entry to DLASWP")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2048, 512, generator=g)
    hessian = x.transpose(1, 2) @ x
    factors, deviation = torch.randn(4, 256, 512, generator=g), torch.randn(4, 512, 512, generator=g)
    call = {
        "inverse_cholesky": lambda: gptq.inverse_cholesky(hessian),
        "compensation": lambda: gptq.compensation("down", hessian),
        "corrected": lambda: gptq.corrected(factors, hessian, deviation, torch.tensor([2048, 100, 5, 0])),
    }[fn]
    main, worker = as_worker(call)
    assert torch.isfinite(main).all() and torch.equal(main, worker)


@pytest.mark.parametrize("projection", ["up", "down"])
def test_the_error_feedback_with_few_tokens_is_the_same_in_a_worker(projection, as_worker):
    # offline.lowrank: 4 experts' 96-224 tokens of 512 coordinates (the busiest at most half of them)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 224, 512, generator=g)
    counts = [224, 96, 160, 0]
    for e, n in enumerate(counts):
        z[e, n:] = 0
    tokens = Tokens(z, counts)
    rows = 64 if projection == "down" else 512  # factors [E, R, I]: the coordinates are I (down) or R (up)
    factors, bits = torch.randn(4, rows, 512, generator=g), torch.randint(1, 5, (4, rows), generator=g)
    deviation = (0.1 * z, torch.tensor(counts)) if projection == "down" else None

    def call():
        share = gptq.compensation(projection, tokens)
        return share, *gptq.round_factors(projection, factors, bits, tokens, 32, 8, deviation=deviation)

    main, worker = as_worker(call)
    assert all(torch.isfinite(m).all() and torch.equal(m, w) for m, w in zip(main, worker, strict=True))
