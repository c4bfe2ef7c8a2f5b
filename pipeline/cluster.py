"""dask.distributed execution of extraction: one task per input shard, teacher built once per worker.

``dask_runner`` returns a :data:`apmpipe.stages.extract.ShardRunner` that submits one task per shard (which
runs :func:`apmpipe.stages.extract.extract_shards` with the worker's own :class:`TeacherPool`, kept by a
worker plugin) to a local cluster (``--workers N``) or an existing scheduler (``--scheduler ADDRESS`` or
``--scheduler-file FILE``). The driver decides the run's precision once (:func:`run_precision`) and passes it
to every task, so workers with and without a GPU write shards of one precision. Tasks are idempotent (a retried
task rewrites its own shard group), so dask's retries after a lost worker are safe. Task keys name the cache and
the input as well as the shard, so two extractions sharing a scheduler never merge their tasks.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import replace

import dask
import fsspec
from distributed import Client, LocalCluster, WorkerPlugin, as_completed, get_worker

from apmpipe.stages.extract import ExtractConfig, ExtractResult, ShardRunner, extract_shards
from apmpipe.stages.shard_results import Progress
from apmpipe.stages.teacher import AUTOCAST, TeacherPool
from apmpipe.storage.cache import FeatureCache
from apmpipe.storage.errors import ConfigError
from apmpipe.storage.sources import ShardSource

from .console import err_console

TASK_RETRIES = 3


@contextlib.contextmanager
def dask_client(
    workers: int = 0,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    resources: dict[str, float] | None = None,
) -> Iterator[Client]:
    """A client on an existing scheduler, or on a local cluster of ``workers`` single-threaded processes
    (each declaring ``resources``, so tasks that ask for them can run there)."""
    if scheduler or scheduler_file:
        try:
            client = Client(scheduler, scheduler_file=scheduler_file, timeout="20s")
        except OSError as exc:
            raise ConfigError(
                f"cannot reach dask scheduler {scheduler or scheduler_file!r} ({exc}); check --scheduler"
            ) from None
        with client:
            yield client
        return
    # Workers must not be daemonic: extraction decodes images in DataLoader worker processes.
    with dask.config.set({"distributed.worker.daemon": False}):
        with (
            LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0", resources=resources
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client


class WorkerTeachers(WorkerPlugin):
    """Each worker's :class:`TeacherPool`: its tasks share one teacher per configuration."""

    name = "apmpipe-teachers"

    def setup(self, worker: object) -> None:
        self.teachers = TeacherPool()


def extract_on_worker(config: ExtractConfig, shards: list[ShardSource]) -> list[ExtractResult]:
    """One task: :func:`extract_shards` with the worker's own teachers."""
    return extract_shards(config, shards, teachers=get_worker().plugins[WorkerTeachers.name].teachers)


def worker_has_cuda() -> bool:
    """Run on each worker: whether its teacher would autocast on a GPU there."""
    import torch

    return torch.cuda.is_available()


def run_precision(client: Client, config: ExtractConfig) -> str:
    """The one precision every task of this run computes in, decided here on the driver: the cache's when it holds
    complete shards, else bfloat16 autocast only when ``--amp`` and every worker now connected has a GPU (a CPU
    worker cannot autocast on CUDA), else float32 (GPU workers then compute in float32 too)."""
    existing = FeatureCache.open(config.out, storage_options=config.storage_options).precision()
    if existing:
        return existing
    gpus = client.run(worker_has_cuda).values()
    return AUTOCAST if config.amp and config.device != "cpu" and gpus and all(gpus) else "float32"


def task_key(config: ExtractConfig, shard: ShardSource) -> str:
    """A dask key unique to (cache, input): ``extract-<shard>-<hash of the resolved cache URL and the input>``."""
    fs, path = fsspec.core.url_to_fs(config.out, **config.storage_options)
    identity = f"{fs.unstrip_protocol(path)}\n{shard.fingerprint}"
    return f"extract-{shard.name}-{hashlib.sha1(identity.encode()).hexdigest()[:16]}"


def dask_runner(
    workers: int = 0,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    resources: dict[str, float] | None = None,
) -> ShardRunner:
    """A shard runner that spreads shards over a dask cluster and reports progress as tasks finish."""

    def run(config: ExtractConfig, shards: list[ShardSource], progress: Progress) -> list[ExtractResult]:
        with dask_client(workers, scheduler, scheduler_file, resources) as client:
            err_console.print(f"dask dashboard: {client.dashboard_link}", highlight=False)
            client.register_plugin(WorkerTeachers())
            config = replace(config, precision=run_precision(client, config))
            futures = [
                client.submit(
                    extract_on_worker,
                    config,
                    [shard],
                    key=task_key(config, shard),
                    pure=False,
                    retries=TASK_RETRIES,
                    resources=resources,
                )
                for shard in shards
            ]
            results: list[ExtractResult] = []
            for future in as_completed(futures):
                for result in future.result():
                    progress.images(result.images)
                    progress.shard(result)
                    results.append(result)
        return results

    return run
