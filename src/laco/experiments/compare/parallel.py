"""Running ``laco compare``'s jobs (one method's training, one read-out) in forked worker processes.

The experiment's models are small, so one torch thread runs a training step nearly as fast as two: a
2-core machine does twice the work with two single-threaded processes. Forked workers share the
replicate's hidden-state caches copy-on-write, and every job draws from its own seeded streams
(``steps.derive_seed``), so results are the same whatever the number of workers (tested).
"""

from __future__ import annotations

import multiprocessing
from typing import Any, Callable, Iterator

import torch

# per-process flag: worker processes turn their per-step progress bars off (several bars on one terminal
# interleave into noise); the parent reports each finished job instead
_progress = True
_jobs: list[Callable[[], Any]] = []


def progress_enabled() -> bool:
    return _progress


def _init_worker(threads: int) -> None:
    global _progress
    _progress = False
    torch.set_num_threads(threads)


def _call(i: int) -> tuple[int, Any]:
    return i, _jobs[i]()


def run_jobs(jobs: list[Callable[[], Any]], workers: int = 1, threads: int = 1) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, result)`` of each zero-argument job as it finishes: in this process, in order, when
    ``workers`` is 1; else in ``workers`` forked processes (``threads`` torch threads each), first come,
    first served, so put the longest job first. Results must be picklable; a job's exception is raised here."""
    global _jobs
    if workers <= 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            yield i, job()
        return
    if "fork" not in multiprocessing.get_all_start_methods():
        raise RuntimeError("compare workers > 1 need the 'fork' start method (Linux, macOS); set workers: 1")
    _jobs = jobs  # inherited by the forked workers, never pickled
    try:
        with multiprocessing.get_context("fork").Pool(min(workers, len(jobs)), _init_worker, (threads,)) as pool:
            yield from pool.imap_unordered(_call, range(len(jobs)), chunksize=1)
    finally:
        _jobs = []
