"""--workers N: N processes, each on an equal share of the threads, that cost MoE layers while the main process walks
the model, and export layers whose rounding does not wait on the layers before them (--feedback-inputs original,
--rounding nearest). Jobs are functions fn(plan, run, *args) that read their inputs from the run directory and write
their results to it, so resume works as in one process; the output is byte for byte the same with any N
(offline/threads.py)."""

import concurrent.futures
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager

import torch
from tqdm import tqdm

from .heap import peak_rss_mb
from .plan import Options, make_plan
from .rundir import RunDir
from .threads import on_threads, set_start_threads, start_threads

_worker: dict = {}  # in a worker process: its plan and run directory


def _start(options: Options, run: RunDir, threads: int, start: int) -> None:
    torch.set_num_threads(threads)
    set_start_threads(start)
    _worker.update(plan=make_plan(options), run=run)


def _call(fn, *args) -> float:
    """fn's job; the worker's peak RSS so far, in MiB."""
    fn(_worker["plan"], _worker["run"], *args)
    return peak_rss_mb()


class Workers:
    def __init__(self, options: Options, run: RunDir, n: int):
        # spawned, not forked: a forked child of a process that has run OpenMP threads may hang in them
        self.share = max(1, start_threads() // n)
        self.pool = ProcessPoolExecutor(
            n,
            multiprocessing.get_context("spawn"),
            initializer=_start,
            initargs=(options, run, self.share, start_threads()),
        )
        self.n = n
        self.peak_rss_mb = 0.0  # the largest of the workers' peak RSS, over the jobs waited for
        self.futures: list[Future] = []

    def submit(self, fn, *args) -> None:
        """Run fn(plan, run, *args) in a worker; first wait while 2 N jobs are pending (each may have left GBs of
        inputs in the run directory, like a big model's walked layer)."""
        while sum(not f.done() for f in self.futures) >= 2 * self.n:
            concurrent.futures.wait(self.futures, return_when=concurrent.futures.FIRST_COMPLETED)
        with self.ended_abruptly():
            self.futures.append(self.pool.submit(_call, fn, *args))

    def wait(self, desc: str) -> None:
        """Until every job submitted is done; the first that failed raises its error here."""
        with self.ended_abruptly():
            for future in tqdm(self.futures, desc=desc, unit="layer"):
                self.peak_rss_mb = max(self.peak_rss_mb, round(future.result(), 1))
        self.futures = []

    @staticmethod
    @contextmanager
    def ended_abruptly():
        """A worker killed (the pool is then broken) -> an OSError that says what to do."""
        try:
            yield
        except BrokenProcessPool as err:
            raise OSError(
                f"a --workers process ended abruptly ({err}); the system may have killed it for memory (each "
                "worker holds a layer's experts): use fewer --workers"
            ) from err

    def main_share(self):
        """The main process on one worker's share of the threads while the workers run beside it."""
        return on_threads(self.share)

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)
