"""Where a grid's records are computed: :func:`make_executor` turns one string into an executor
with the :mod:`concurrent.futures` interface (``submit`` returning a ``Future``, ``shutdown``).

=========================  ===================================================================
spec                       executor
=========================  ===================================================================
``None``, ``"inline"``     this process, one record at a time (the default)
``"processes:N"``          N local worker processes (spawned), each with torch threads = cores // N
``"dask:local"``,          a ``distributed.LocalCluster`` of N single-threaded worker processes
``"dask:local:N"``         (default: one per two cores), torch threads = cores // N each
``"dask:ADDRESS"``         a running Dask scheduler, e.g. ``dask:tcp://host:8786`` (through
                           ``Client.get_executor``); the workers' threads are the cluster's
``"submitit:local"``       submitit's local executor: one process per record (for testing a
                           SLURM setup on one machine)
``"slurm"``,               SLURM through submitit; ``KEY=VALUE`` pairs go to submitit's
``"slurm:K=V,K=V"``        ``update_parameters``, e.g. ``slurm:slurm_partition=cpu,cpus_per_task=4,
                           timeout_min=60,mem_gb=16`` (torch threads = ``cpus_per_task``)
=========================  ===================================================================

Notebooks and ``make reproduce`` read the spec from ``EXECUTOR`` (:func:`from_env`).

Dask (``dask``, ``distributed``) is a dependency of the project; submitit is optional
(``pip install submitit``). A missing one, or a spec none of the above, is a one-line
``ValueError``. Every worker must see the same cache directory (``SPECTRAL_MERGE_CACHE``, a
shared filesystem on a cluster): workers load the experts from it by path
(:mod:`lib.runner`); only the configurations and the records travel.

Torch threads. Worker processes read ``SPECTRAL_MERGE_TORCH_THREADS`` (set here for the local
executors) or SLURM's ``SLURM_CPUS_PER_TASK`` once (:func:`configure_threads`), so N workers on
one machine share its cores instead of each starting a thread per core.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from pathlib import Path

from . import paths

THREADS_VARIABLE = "SPECTRAL_MERGE_TORCH_THREADS"
_configured = False


def cores() -> int:
    """CPU cores this process may use (its affinity where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    return max(1, cores() // max(1, workers))


def configure_threads() -> None:
    """Set torch's intra-op threads once per process from ``SPECTRAL_MERGE_TORCH_THREADS`` or
    ``SLURM_CPUS_PER_TASK`` (nothing when neither is set: the process keeps torch's default)."""
    global _configured
    if _configured:
        return
    _configured = True
    value = os.environ.get(THREADS_VARIABLE) or os.environ.get("SLURM_CPUS_PER_TASK")
    if value:
        import torch

        torch.set_num_threads(max(1, int(value)))


def _init_worker(threads: int) -> None:
    os.environ[THREADS_VARIABLE] = str(threads)
    configure_threads()


class InlineExecutor(Executor):
    """Runs each submitted call at once in this process and returns its finished future."""

    workers = 1

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as err:  # handed to the caller through the future; an interrupt propagates
            future.set_exception(err)
        return future

    def __repr__(self) -> str:
        return "InlineExecutor()"


class LocalProcesses(ProcessPoolExecutor):
    """``processes:N``: a spawned process pool whose workers run with cores // N torch threads
    (or ``threads``; spawn, not fork: a forked torch with live threads can deadlock)."""

    def __init__(self, workers: int, *, threads: int | None = None):
        self.workers = workers
        self.threads = threads or threads_per_worker(workers)
        super().__init__(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.threads,),
        )

    def __repr__(self) -> str:
        return f"LocalProcesses({self.workers}, threads={self.threads})"


class DaskExecutor(Executor):
    """A ``distributed`` client's executor that also closes the client (and the local cluster it
    started) on :meth:`shutdown`."""

    def __init__(self, address: str | None = None, *, workers: int | None = None, **cluster_kwargs):
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise ValueError(
                "executor 'dask:...' needs dask and distributed: pip install -r requirements.txt"
            ) from None
        self.cluster = None
        if address is None:
            n = workers or max(1, cores() // 2)
            options = {"n_workers": n, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
            options.update(cluster_kwargs)
            if options["processes"]:
                options.setdefault("env", {THREADS_VARIABLE: str(threads_per_worker(n))})
            self.cluster = LocalCluster(**options)
            self.client = Client(self.cluster)
            self.workers = n * options["threads_per_worker"]
        else:
            self.client = Client(address)
            self.workers = sum(w.get("nthreads", 1) for w in self.client.scheduler_info()["workers"].values()) or None
        # pure=False: a record is computed every time it is submitted (the store decides what is new)
        self.executor = self.client.get_executor(pure=False)

    def submit(self, fn, /, *args, **kwargs) -> Future:
        return self.executor.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.executor.shutdown(wait=wait and not cancel_futures)
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def __repr__(self) -> str:
        return f"DaskExecutor({self.client.scheduler.address})"


class SubmititExecutor(Executor):
    """submitit's jobs behind ``concurrent.futures`` futures: a thread polls the jobs and
    completes their futures; cancelling a future cancels its job."""

    def __init__(self, executor, *, poll_s: float = 0.5, workers: int | None = None):
        self.executor = executor
        self.poll_s = poll_s
        self.workers = workers
        self._jobs: list[tuple[object, Future]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="submitit-poll", daemon=True)
        self._thread.start()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        job = self.executor.submit(fn, *args, **kwargs)
        future: Future = Future()
        with self._lock:
            self._jobs.append((job, future))
        return future

    def _poll(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                jobs = list(self._jobs)
            finished = []
            for job, future in jobs:
                if future.cancelled():
                    job.cancel(check=False)
                    finished.append((job, future))
                elif job.done():
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(job.result())
                        except BaseException as err:  # noqa: BLE001 -- the job's error, for the caller
                            future.set_exception(err)
                    finished.append((job, future))
            with self._lock:
                self._jobs = [j for j in self._jobs if j not in finished]
            self._stop.wait(self.poll_s)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures:
            with self._lock:
                for _, future in self._jobs:
                    future.cancel()
        while wait and not cancel_futures:
            with self._lock:
                if not self._jobs:
                    break
            time.sleep(self.poll_s)
        if cancel_futures:
            time.sleep(2 * self.poll_s)  # let the poller cancel the jobs
        self._stop.set()
        self._thread.join()

    def __repr__(self) -> str:
        return f"SubmititExecutor({type(self.executor).__name__})"


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ValueError(
            "executors 'submitit:local' and 'slurm' need submitit, an optional dependency: pip install submitit"
        ) from None
    return submitit


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def submitit_folder() -> Path:
    """Where submitit keeps its job files (pickled calls, logs): the cache's ``submitit/``."""
    return paths._env_path("SPECTRAL_MERGE_CACHE", paths.ROOT / ".cache") / "submitit" / "%j"


SPECS = "inline, processes:N, dask:local[:N], dask:ADDRESS, submitit:local, slurm[:KEY=VALUE,...]"


def make_executor(spec: str | Executor | None = None, **options) -> Executor:
    """The executor a spec names (module docstring); an :class:`~concurrent.futures.Executor`
    is returned as it is. ``options`` go to ``LocalCluster`` for ``dask:local`` (e.g.
    ``processes=False`` for threads in this process)."""
    if isinstance(spec, Executor):
        return spec
    text = "inline" if spec is None else str(spec).strip()
    name, _, rest = text.partition(":")
    if name == "inline" and not rest:
        return InlineExecutor()
    if name == "processes":
        if not rest.isdigit() or int(rest) < 1:
            raise ValueError(f"executor {text!r}: processes:N needs a number of workers N >= 1, e.g. processes:2")
        return LocalProcesses(int(rest))
    if name == "dask" and rest:
        if rest == "local" or rest.startswith("local:"):
            n = rest.partition(":")[2]
            if n and (not n.isdigit() or int(n) < 1):
                raise ValueError(f"executor {text!r}: dask:local:N needs a number of workers N >= 1")
            return DaskExecutor(workers=int(n) if n else None, **options)
        return DaskExecutor(rest)
    if name == "submitit" and rest == "local":
        submitit = _submitit()
        return SubmititExecutor(submitit.LocalExecutor(folder=submitit_folder()), poll_s=0.2)
    if name == "slurm":
        params = {}  # the spec is checked before submitit is imported: a typo is the error to report
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"executor {text!r}: slurm options are KEY=VALUE pairs, got {item!r}")
            params[key.strip()] = _parse_value(value.strip())
        submitit = _submitit()
        executor = submitit.AutoExecutor(folder=submitit_folder(), cluster="slurm")
        if params:
            executor.update_parameters(**params)
        return SubmititExecutor(executor, poll_s=5.0)
    raise ValueError(f"unknown executor {text!r}; use one of {SPECS}")


def from_env(default: str = "inline") -> str:
    """The executor spec of ``EXECUTOR`` (the notebooks' and ``make reproduce``'s parameter)."""
    return os.environ.get("EXECUTOR", default) or default
