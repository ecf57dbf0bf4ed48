"""What this machine offers the pipeline's processes: how their threads wait, how they import their
libraries, and data-loading workers.

One place decides how torch's compute threads behave on a machine they may share, how a process spares
its garbage collector the libraries' millions of objects, and how many worker processes prepare data
beside the model, from the cores a process may use, whether a GPU waits for the data, and how many
training processes share the machine.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
from collections.abc import Iterator

# How torch's OpenMP threads wait for work, read by the OpenMP runtime once, when torch loads. By
# default they spin before they sleep; beside another busy process (a `nice 19` job on the same 2
# cores) a spinning thread holds a core its neighbour would run on, and the thread it waits for cannot
# run: the demo took 33 minutes instead of 10 beside one, with 2,721 s of user CPU time. Passive threads
# sleep at once (bench/README.md, *Threads beside a neighbour*). A value set by the user wins.
THREAD_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}

# Beyond this, workers only add memory (each holds its prefetched batches of pixels).
MAX_DATA_WORKERS = 8


def settle_threads() -> None:
    """Put `THREAD_ENVIRONMENT` in this process's environment (and its children's) where the user has
    not set it. Called when the package is imported, so before torch loads in a pipeline process
    (Dagster's code server and run workers, training processes); where torch is loaded already it
    still reaches every process started from here."""
    for name, value in THREAD_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def heavy_imports() -> Iterator[None]:
    """For the block where a process imports its model libraries (torch, transformers, PEFT, MLflow: millions
    of objects that live as long as the process). Python's cyclic garbage collector is paused in it: it ran
    after every 700 new objects and walked those, again and again, for 1.3 s of the 8 s of CPU the imports
    take. If the block loaded modules, what exists after it is frozen (`gc.freeze`): no later collection walks
    it again, nor does the process's exit take it apart (bench/README.md, *Process start-up*). What the
    process makes afterwards, its models and pictures, is collected as before; a process that has its
    libraries already (a second run in the same process) freezes nothing more."""
    loaded = len(sys.modules)
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
    if len(sys.modules) > loaded:
        gc.freeze()


def settle_exit() -> None:
    """When the process ends, freeze its heap before the interpreter tears it down: its last collections then
    skip the libraries' millions of objects, which the OS reclaims at once anyway (0.7 s of a data step's
    3.5 s of CPU, 1.8 s of a model step's 12.6 s). Explicit clean-ups (files closed, atexit handlers, logging's
    flush) all still run; only finalizers of objects caught in reference cycles are skipped, as Python
    never promised them at exit."""
    atexit.register(gc.freeze)


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


def machine_prepare_workers(cuda: bool, cpus: int | None = None) -> int:
    """Threads that prepare the evaluator's batches ahead of the model: with a GPU, enough cores that
    the processor keeps up with it (up to `MAX_DATA_WORKERS`, one core left to the process driving
    the GPU); none on a CPU-only machine, where the model's threads use every core and preparing in
    the caller's thread was measured no slower (bench/README.md, *Overlapped input*)."""
    if not cuda:
        return 0
    cpus = cpus if cpus is not None else usable_cpus()
    return max(1, min(MAX_DATA_WORKERS, cpus - 1))
