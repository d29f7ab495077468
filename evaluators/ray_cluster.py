"""Ray set-up for the evaluation pool: starting or joining Ray, and checking what it offers.

``ensure_ray`` starts a local Ray (with the CPUs, and GPUs when asked, that the run needs)
or joins a cluster; ``check_cluster_cpus`` and ``check_cluster_gpus`` tell whether the
cluster can ever schedule the pool's actors and the run's other Ray tasks.

GPUs: an actor asks Ray for ``num_gpus`` (``gpus_per_worker``); Ray then sets the actor's
``CUDA_VISIBLE_DEVICES`` to the GPU(s) it was given, so ``device = "cuda"`` inside it is
that GPU. A fraction below 1 lets several actors share one GPU (0.5: two per GPU); Ray
accepts fractions only below 1, whole numbers above. An actor with no GPUs keeps the
``CUDA_VISIBLE_DEVICES`` it inherited (Ray 2.60 overrides it only for actors given GPUs,
unless ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO`` is set): it sees every GPU of its machine.
"""

from __future__ import annotations

import math
import os
from typing import Any

from spaces.checks import check_int, check_number


def check_gpus_per_worker(name: str, value: Any) -> float:
    """A number >= 0 that Ray accepts as ``num_gpus``: a fraction below 1 or a whole number."""
    gpus = check_number(name, value, 0.0)
    if gpus > 1 and not gpus.is_integer():
        raise ValueError(f"{name} must be a fraction below 1 or a whole number (Ray's rule for num_gpus), got {value!r}")
    return gpus


def ensure_ray(address: str | None, num_cpus: int | None, num_gpus: int | None = None) -> None:
    """``ray.init`` unless Ray is already initialised in this process.

    ``address`` (or the ``RAY_ADDRESS`` environment variable) joins an existing cluster;
    otherwise a local instance with ``num_cpus`` CPUs is started, and with ``num_gpus``
    GPUs declared when given (``None``: Ray counts the machine's GPUs itself).
    """
    if num_cpus is not None:
        check_int("num_cpus", num_cpus, 1)
    if num_gpus is not None:
        check_int("num_gpus", num_gpus, 0)
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, configure_logging=False)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(configure_logging=False)  # Ray reads RAY_ADDRESS itself (e.g. under `ray job submit`)
    else:
        # Ray starts worker processes at nice 15 by default (to keep its own daemons
        # responsive); the evaluations *are* this job's work, and on a shared machine
        # niced workers starve behind any other process. Run them at normal priority.
        ray.init(
            num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, configure_logging=False,
            _system_config={"worker_niceness": 0},
        )


def check_cluster_cpus(total: float, workers: int, threads_per_worker: int,
                       tasks: dict[str, tuple[int, int]]) -> str | None:
    """Whether ``total`` Ray CPUs can run the pool's actors and other Ray tasks of the run.

    ``tasks`` maps who runs them (e.g. ``"searcher 'masking'"``) to ``(tasks at once, CPUs
    each)``. The actors that fit hold their CPUs for the pool's lifetime, so a task needing
    more CPUs than they leave free could never be scheduled: ``ValueError``. When the CPUs
    cover each task but not everything at once, a warning line is returned (work then
    queues); ``None`` when they cover it all. CPUs are counted over the whole cluster.
    """
    held = min(workers, int(total // threads_per_worker)) * threads_per_worker
    free = total - held
    for who, (count, cpus) in tasks.items():
        if count > 0 and cpus > free:
            raise ValueError(
                f"{who} runs Ray tasks of {cpus} CPU(s), but the evaluation workers ({workers} x "
                f"{threads_per_worker} thread(s)) hold {held:g} of the Ray cluster's {total:g} CPUs: lower "
                f"[study] workers or threads_per_worker, or give the cluster more CPUs"
            )
    need = workers * threads_per_worker + sum(count * cpus for count, cpus in tasks.values())
    return (f"the run asks for {need} Ray CPUs (evaluation workers and searchers' tasks) but the Ray "
            f"cluster has {total:g}; some of that work will queue") if need > total else None


def check_cluster_gpus(total: float, workers: int, gpus_per_worker: float) -> str | None:
    """Whether ``total`` Ray GPUs can run the pool's actors of ``gpus_per_worker`` each.

    ``ValueError`` when not even one actor fits (it would wait forever); a warning line
    when some of them will wait for GPUs; ``None`` when all fit (or none asks for a GPU).
    """
    if gpus_per_worker <= 0:
        return None
    if total < gpus_per_worker:
        raise ValueError(
            f"[study] gpus_per_worker = {gpus_per_worker:g} but the Ray cluster has {total:g} GPU(s): "
            "give it GPUs, or set gpus_per_worker = 0 (and [evaluation] device = \"cpu\")"
        )
    # Ray packs fractions GPU by GPU: at 0.4, two actors per GPU (not five on two GPUs).
    per_gpu = math.floor(1 / gpus_per_worker + 1e-9) if gpus_per_worker < 1 else 0
    fit = per_gpu * math.floor(total) if per_gpu else math.floor(total / gpus_per_worker)
    if fit < workers:
        return (f"{workers} evaluation workers x {gpus_per_worker:g} GPU need {workers * gpus_per_worker:g} GPUs but "
                f"the Ray cluster has {total:g}; {workers - fit} worker(s) will wait for a GPU")
    return None
