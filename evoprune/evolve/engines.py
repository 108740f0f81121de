"""Where fitness calls run: one DEAP-style ``map(fn, iterable)`` per engine, and the fitness state they share.

* ``serial``: the builtin ``map`` in this process.
* ``scoop``: ``scoop.futures.map``; the program must be launched with ``python -m scoop`` (the default there).
* ``processes``: the standard library's ``ProcessPoolExecutor`` on this machine (no extra dependency).
* ``dask``: a Dask ``distributed`` cluster: a ``LocalCluster`` here, or an existing one (``scheduler=ADDRESS``,
  e.g. started by ``dask-jobqueue`` on SLURM/PBS/SGE/LSF). Needs ``pip install 'evoprune[dask]'``.

:func:`make_map` builds one (:func:`opened` also closes it); ``register(..., map=...)`` and ``search(..., map=...)``
take any of them, or any other DEAP-style map. Fitness state (the model and the scoring tensors of an
:class:`evoprune.evolve.fitness.Evaluator`) is
*published* here once per evaluator (:func:`publish`) and reaches each worker process once: ``scoop.shared`` under
SCOOP, the pool's initializer for ``processes`` (the pool is re-created when the published state changes, i.e.
once per round), and ``Client.scatter(broadcast=True)`` for Dask. What travels with every task is the evaluator's
token and the individual: a few hundred bytes. Worker processes use one torch thread each.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import pickle
import random
import time
from typing import Any, Callable, Iterator

import numpy as np

from .._version import __version__
from ..errors import ConfigError, EngineError
from ..validators import check_int

EXECUTORS = ("serial", "scoop", "processes", "dask")
CONNECT_TIMEOUT_S = 20  # an unreachable --scheduler fails within this many seconds

_PUBLISHED: dict[str, Any] = {}  # token -> fitness state, in this process
_OWNED: set[str] = set()  # the tokens this process published itself (the others came from an engine)
_THREADS_SET = [False]


# ------------------------------------------------------------------------------------------ published state
def publish(token: str, payload) -> None:
    """Make ``payload`` (an evaluator's state) available to this process and to the workers of any engine."""
    _PUBLISHED[token] = payload
    _OWNED.add(token)
    if under_scoop():
        from scoop import shared
        shared.setConst(**{token: payload})


def fetch(token: str, timeout: float = 300.0):
    """The state published under ``token``: this process's copy, else SCOOP's (waiting up to ``timeout`` s), else
    None."""
    payload = _PUBLISHED.get(token)
    if payload is None and under_scoop():
        from scoop import shared
        payload = shared.getConst(token, timeout=timeout)
    return payload


def owned(token: str) -> bool:
    """Whether this process published ``token`` (the main program), rather than received it (a worker)."""
    return token in _OWNED


def forget(token: str) -> None:
    """Drop this process's copy of ``token``'s state (SCOOP would keep every constant forever)."""
    _PUBLISHED.pop(token, None)
    _OWNED.discard(token)
    if under_scoop():
        from scoop import shared
        for values in (shared.elements or {}).values():
            values.pop(token, None)


def _published() -> dict[str, Any]:
    """What this process published and still holds: the state an engine ships to its workers."""
    return {t: p for t, p in _PUBLISHED.items() if t in _OWNED}


def _install(payloads: dict | bytes, threads: int = 1) -> None:
    """In a worker process: hold ``payloads`` (and no state of another round), with ``threads`` torch threads.
    Bytes are unpickled here: the process pool passes them so, because multiprocessing's pickler would put the
    tensors in memory shared by every worker, and scoring re-calibrates BatchNorm statistics in place."""
    if isinstance(payloads, bytes):
        payloads = pickle.loads(payloads)
    for token in [t for t in _PUBLISHED if t not in payloads and t not in _OWNED]:
        del _PUBLISHED[token]
    for token, payload in payloads.items():
        _PUBLISHED.setdefault(token, payload)
    if not _THREADS_SET[0]:
        import torch
        torch.set_num_threads(threads)
        _THREADS_SET[0] = True


# ------------------------------------------------------------------------------------------ SCOOP
def under_scoop() -> bool:
    """True when this program was launched with ``python -m scoop``."""
    import scoop
    return bool(getattr(scoop, "IS_RUNNING", False))


def scoop_origin() -> bool:
    """True in the main program of a SCOOP run, False in its workers and outside SCOOP."""
    import scoop
    return under_scoop() and bool(getattr(scoop, "IS_ORIGIN", False))


def default_map() -> Callable:
    """``scoop.futures.map`` under ``python -m scoop``, the builtin ``map`` otherwise (no SCOOP warnings)."""
    if under_scoop():
        from scoop import futures
        return futures.map
    return map


# ------------------------------------------------------------------------------------------ processes
def _pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


class _Closing:
    """``with engine as m: ...`` closes the engine on exit."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ProcessMap(_Closing):
    """``map`` on a ``concurrent.futures.ProcessPoolExecutor`` of ``workers`` processes (spawned: safe with torch's
    thread pools). The pool starts, all its processes at once, on the first call and again whenever the published
    fitness state changed (a new round's evaluator), so each worker receives each state once, through the pool's
    initializer. ``close()`` (or a ``with`` block) shuts it down."""

    def __init__(self, workers: int | None = None):
        check_executor("processes", None, workers)
        self.workers = workers or multiprocessing.cpu_count()
        self._pool: cf.ProcessPoolExecutor | None = None
        self._tokens: tuple = ()

    def __call__(self, fn: Callable, *iterables):
        state = _published()
        if self._pool is None or tuple(state) != self._tokens:
            self.close()
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_install, initargs=(pickle.dumps(state),))
            self._tokens = tuple(state)
            self._start_all()
        return self._pool.map(fn, *iterables)

    def _start_all(self, timeout: float = 300.0) -> None:
        """Wait until every worker process is up. The pool spawns processes on demand (one per task submitted while
        none is idle), and each imports torch and unpickles the state: left alone, some would still be starting
        during the first maps, taking the CPU from the fitness calls and running fewer of them at once."""
        seen, deadline = set(), time.monotonic() + timeout
        while len(seen) < self.workers and time.monotonic() < deadline:
            seen.update(self._pool.map(_pid_after, [0.05] * self.workers))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __repr__(self):
        return f"ProcessMap({self.workers} workers)"


# ------------------------------------------------------------------------------------------ Dask
def _dask_task(*args, fn, payloads):
    """One fitness call on a Dask worker: the state arrives as worker-local data (scattered once), the individual
    with the task."""
    _install(payloads)
    return fn(*args)


def _results(futures, state):
    """The futures' results in order; the random state ``state`` is restored when the last has arrived."""
    try:
        for f in futures:
            yield f.result()
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])


def _worker_version() -> str:
    from .. import _version
    return _version.__version__


class DaskMap(_Closing):
    """``map`` on a Dask ``distributed`` cluster: ``scheduler`` (an address such as ``tcp://10.0.0.5:8786``), or a
    ``LocalCluster`` of ``workers`` processes with one thread each. Results come back in order; a task whose worker
    dies is re-run on another (Dask's ``allowed-failures``), so a generation completes and each individual gets one
    score. Fitness state is scattered to every worker once per evaluator (``broadcast=True``) and released when the
    evaluator is. ``close()`` (or a ``with`` block) closes the client and a cluster it started."""

    def __init__(self, scheduler: str | None = None, workers: int | None = None, *, client=None):
        check_executor("dask", scheduler, workers)
        import distributed
        self._cluster = None
        if client is not None:
            self.client = client
        elif scheduler:
            try:
                self.client = distributed.Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
            except (OSError, TimeoutError) as exc:
                raise EngineError(f"cannot reach the Dask scheduler at {scheduler} within {CONNECT_TIMEOUT_S} s "
                                  f"({type(exc).__name__}: {exc}); start it (dask scheduler, or dask-jobqueue) or "
                                  "check the address") from None
        else:
            n = workers or multiprocessing.cpu_count()
            self._cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                                     dashboard_address=None)
            self.client = distributed.Client(self._cluster)
        self._futures: dict[str, Any] = {}
        self._checked: set[str] = set()
        try:
            if self._cluster is not None:
                # a loaded machine can register the last worker after Client() returns; the state is broadcast to
                # the workers present at the first map, so wait for all of them first
                try:
                    self.client.wait_for_workers(n, timeout=f"{4 * CONNECT_TIMEOUT_S}s")
                except TimeoutError:
                    raise EngineError(f"the local Dask cluster started {len(self.client.scheduler_info()['workers'])}"
                                      f" of {n} workers within {4 * CONNECT_TIMEOUT_S} s; ask for fewer workers "
                                      "or free the machine") from None
            self.check_versions()
        except EngineError:
            self.close()
            raise

    def check_versions(self) -> None:
        """:class:`EngineError` naming both versions if a worker runs another evoprune than this process. Run at
        the start and again before a map when workers have joined since (a batch system scaling up)."""
        theirs = self.client.run(_worker_version)
        self._checked = set(theirs)
        other = {addr: v for addr, v in theirs.items() if v != __version__}
        if other:
            addr, version = next(iter(other.items()))
            raise EngineError(f"Dask worker {addr} runs evoprune {version}, this program runs evoprune {__version__}"
                              f" ({len(other)} of {len(theirs)} workers differ): install the same version on every "
                              "worker")

    def _sync(self) -> dict[str, Any]:
        state = _published()
        for token in [t for t in self._futures if t not in state]:
            self._futures.pop(token).release()
        for token, payload in state.items():
            if token not in self._futures:
                # one future for the whole payload (scatter maps over a dict or list it is given)
                self._futures[token] = self.client.scatter([payload], broadcast=True, hash=False)[0]
        return dict(self._futures)

    def __call__(self, fn: Callable, *iterables):
        # A LocalCluster's scheduler runs in this process and draws from the global ``random`` (worker choice,
        # work stealing): the search's random stream (DEAP's) is put back as it was once the map is done, so that
        # a seeded search gives the same plans as a serial one.
        state = random.getstate(), np.random.get_state()
        if set(self.client.scheduler_info()["workers"]) - self._checked:
            self.check_versions()
        payloads = self._sync()
        futures = self.client.map(_dask_task, *iterables, fn=fn, payloads=payloads, pure=False)
        return _results(futures, state)

    def close(self) -> None:
        for f in self._futures.values():
            f.release()
        self._futures.clear()
        if getattr(self, "client", None) is not None:
            self.client.close()
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

    def __repr__(self):
        return f"DaskMap({self.client.scheduler.address})"


# ------------------------------------------------------------------------------------------ choosing one
def check_executor(executor: str | None, scheduler: str | None = None, workers: int | None = None) -> None:
    """:class:`ConfigError` (``setting`` ``executor``, ``scheduler`` or ``workers``) unless the engine can be made:
    a known name, a scheduler only for dask, the dask extra installed for dask, a positive worker count."""
    if executor is not None and executor not in EXECUTORS:
        raise ConfigError(f"must be one of {', '.join(EXECUTORS)}, got {executor!r}", setting="executor")
    if scheduler and executor != "dask":
        raise ConfigError(f"is a Dask scheduler address; it needs the dask executor, not {executor or 'the default'}",
                          setting="scheduler")
    check_int("workers", workers, optional=True)
    if executor == "dask":
        import importlib.util
        if importlib.util.find_spec("distributed") is None:
            raise ConfigError("dask needs Dask distributed: pip install 'evoprune[dask]'", setting="executor")


def make_map(executor: str | None = None, *, scheduler: str | None = None, workers: int | None = None) -> Callable:
    """The map of a named engine (:data:`EXECUTORS`); None: SCOOP's under ``python -m scoop``, serial otherwise.
    ``ProcessMap`` and ``DaskMap`` hold processes: close them (``with make_map(...) as m``) when done.
    :class:`ConfigError` (``setting`` ``executor``/``scheduler``) for a bad combination, before any work."""
    check_executor(executor, scheduler, workers)
    if executor is None:
        executor = "scoop" if under_scoop() else "serial"
    if executor == "serial":
        return map
    if executor == "scoop":
        if not under_scoop():
            raise ConfigError("scoop needs the program launched with python -m scoop [-n N] ...", setting="executor")
        if workers is not None:
            raise ConfigError("goes with processes or dask; SCOOP's workers are python -m scoop -n N",
                              setting="workers")
        from scoop import futures
        return futures.map
    if executor == "processes":
        return ProcessMap(workers)
    return DaskMap(scheduler, workers)


@contextlib.contextmanager
def opened(executor: str | None = None, *, scheduler: str | None = None,
           workers: int | None = None) -> Iterator[Callable]:
    """``with opened("dask", workers=2) as m: search(..., map=m)``: :func:`make_map`, closed on exit (a process pool
    or a Dask client and its local cluster; nothing for the builtin map or SCOOP's)."""
    engine = make_map(executor, scheduler=scheduler, workers=workers)
    try:
        yield engine
    finally:
        if hasattr(engine, "close"):
            engine.close()


__all__ = ["EXECUTORS", "check_executor", "make_map", "opened", "ProcessMap", "DaskMap", "default_map", "under_scoop",
           "publish", "fetch", "forget"]
