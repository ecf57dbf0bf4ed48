"""What this machine offers the pipeline's processes: cores for data-loading workers.

One place decides how many worker processes prepare data beside the model, from the cores a process
may use, whether a GPU waits for the data, and how many training processes share the machine.
"""

from __future__ import annotations

import os

# Beyond this, workers only add memory (each holds its prefetched batches of pixels).
MAX_DATA_WORKERS = 8


def usable_cpus() -> int:
    """The cores this process may run on (its affinity, which a container or `taskset` narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine_data_workers(cpus: int | None = None, cuda: bool | None = None, local_processes: int | None = None) -> int:
    """DataLoader workers for this machine: with a GPU to keep busy, the cores left to each training
    process after its own, up to `MAX_DATA_WORKERS`; none on a CPU-only machine, where the model's
    threads already use every core and a worker would only take turns with them (measured in
    bench/README.md, *Training data loading*).

    `cpus`: the cores to share (default: this process's, `usable_cpus`); `local_processes`: the training
    processes on this machine (default: torchrun's LOCAL_WORLD_SIZE, else 1).
    """
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        return 0
    cpus = cpus if cpus is not None else usable_cpus()
    local = local_processes if local_processes is not None else int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return max(0, min(MAX_DATA_WORKERS, cpus // max(1, local) - 1))
