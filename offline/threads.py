"""The quantizer's output does not depend on --workers, which gives each process a share of the threads. Matrix
products, triangular solves and reductions along a dimension give the same bits on any number of threads; MKL's
LAPACK factorisations (eigh, cholesky) and torch's reductions of a whole large tensor to one number split their work
by thread and round differently. Those run on the thread count the quantizer started with (factor_threads), in the
workers too: the same as one process, at its speed."""

from contextlib import contextmanager

import torch

_start_threads = torch.get_num_threads()


def set_start_threads(n: int) -> None:
    """In a worker: the thread count of the process that started it."""
    global _start_threads
    _start_threads = n


def start_threads() -> int:
    return _start_threads


@contextmanager
def on_threads(n: int):
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def factor_threads():
    return on_threads(_start_threads)
