"""Using both CPU cores: plans of different modalities optimised side by side, dose
calculations split by beams (dose is additive over beams).

A plan's beams are split into one group per worker (balanced by beamlet count); each worker
recalculates its group's dose with the group's weights and the partial doses are summed in a
fixed order, so the same plan on the same image always gives bit-identical doses.

Workers come from a fork server that imported pyRadPlan once (``_preload``): they start fast
and never inherit the OpenMP/BLAS thread state of the main process (forking that directly is
unsafe once numba or torch ran). They are started when the pool opens, so their start overlaps
reading the first case. A pool that breaks falls back to the sequential calculation: a worker
problem costs time, never a result.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from latent.evaluation.dose.extra import load_pyradplan
from latent.evaluation.dose.planning import PlanningInputs, TreatmentPlan, optimise_plan, recalculate, split_beams
from latent.evaluation.dose.protocol import DoseProtocol

logger = logging.getLogger(__name__)

#: Thread-pool sizes of the worker processes (OpenBLAS, OpenMP, MKL, numba).
SINGLE_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}


def default_workers() -> int:
    """Worker processes used by default: the CPU cores, at most 2 (the reference machine)."""
    return max(1, min(2, os.cpu_count() or 1))


def _initialise_worker(quiet: bool) -> None:
    load_pyradplan(quiet)


class RecalculationPool:
    """Worker processes for :func:`recalculate_plans`; use as a context manager."""

    def __init__(self, workers: int | None = None, quiet: bool = True) -> None:
        self.workers = default_workers() if workers is None else max(1, int(workers))
        self.quiet = quiet
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> "RecalculationPool":
        if self.workers > 1:
            if "forkserver" in multiprocessing.get_all_start_methods():
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(["latent.evaluation.dose._preload"])
            else:
                context = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=context, initializer=_initialise_worker, initargs=(self.quiet,),
            )
            # One thread per worker: the workers already fill the cores, and BLAS / numba thread
            # pools inside each of them would only oversubscribe them. The environment is read
            # when the fork server starts (during the first submit), then restored.
            saved = {name: os.environ.get(name) for name in SINGLE_THREAD_ENV}
            os.environ.update(SINGLE_THREAD_ENV)
            try:
                for _ in range(self.workers):  # start the workers now, without waiting for them
                    self._executor.submit(os.getpid)
            finally:
                for name, value in saved.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
        return self

    def __exit__(self, *exc_info) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def submit(self, function, *args) -> Future | None:
        """Run ``function(*args)`` in a worker; None when running sequentially (or broken)."""
        if self._executor is None:
            return None
        try:
            return self._executor.submit(function, *args)
        except (BrokenProcessPool, RuntimeError) as error:
            logger.warning("dose worker pool unusable (%s); asked for %d workers, running sequentially in this process",
                           type(error).__name__, self.workers)
            self._executor = None
            return None


def optimise_plans(
    modes: list[str], inputs: PlanningInputs, protocol: DoseProtocol, pool: RecalculationPool | None = None, quiet: bool = True
) -> dict[str, TreatmentPlan]:
    """Optimise the plans of ``modes``: the first here, the others meanwhile in workers."""
    futures = {mode: pool.submit(optimise_plan, mode, inputs, protocol, quiet) if pool is not None else None
               for mode in modes[1:]}
    plans = {modes[0]: optimise_plan(modes[0], inputs, protocol, quiet)} if modes else {}
    for mode, future in futures.items():
        plan = None
        if future is not None:
            try:
                plan = future.result()
            except BrokenProcessPool:
                logger.warning("dose worker pool broke; optimising the %s plan in this process", mode)
        plans[mode] = plan if plan is not None else optimise_plan(mode, inputs, protocol, quiet)
    return plans


def recalculate_plans(
    jobs: list[tuple[TreatmentPlan, np.ndarray]],
    inputs: PlanningInputs,
    protocol: DoseProtocol,
    pool: RecalculationPool | None = None,
    quiet: bool = True,
) -> list[np.ndarray]:
    """Dose (z, y, x, Gy) of each ``(plan, hu)`` job: the plan's fixed weights on that image.

    All jobs' beam groups go to the pool at once (largest first), so photon and proton work
    share the workers; the groups of a job are summed in a fixed order.
    """
    workers = pool.workers if pool is not None else 1
    parts = [(index, part, hu) for index, (plan, hu) in enumerate(jobs) for part in split_beams(plan, workers)]
    order = sorted(range(len(parts)), key=lambda i: -parts[i][1].weights.size)
    futures: dict[int, Future | None] = {}
    for i in order:
        _, part, hu = parts[i]
        futures[i] = pool.submit(recalculate, part, hu, inputs, protocol, quiet) if pool is not None else None
    doses = [np.zeros(hu.shape, np.float32) for _, hu in jobs]
    for i, (index, part, hu) in enumerate(parts):
        partial = None
        if futures[i] is not None:
            try:
                partial = futures[i].result()
            except BrokenProcessPool:
                logger.warning("dose worker pool broke; recalculating %s beams in this process", part.mode)
        if partial is None:
            partial = recalculate(part, hu, inputs, protocol, quiet)
        doses[index] += partial
    return doses
