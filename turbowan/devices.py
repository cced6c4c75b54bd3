"""Which device to compute on, and how much memory a CUDA device has free."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Optional

import torch


def default_device() -> torch.device:
    """The compute device when none is given: the first CUDA GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def indexed(device) -> torch.device:
    """``device`` with its index: plain "cuda" names the current CUDA device ("cuda:N"), so that one device has
    one name wherever models are kept or looked up (anything else is returned as a torch.device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def pick_device(name: Optional[str]) -> torch.device:
    """The device a user named (``cuda``, ``cuda:1``, ``cpu``), checked to exist here; None: `default_device`."""
    if name is None:
        return default_device()
    return check_device(name, option="--device")


def check_device(device, option: str = "device") -> torch.device:
    """``device`` (a name or a torch.device) as a torch.device this machine can compute on: a CPU or a present
    CUDA GPU; anything else is refused in one sentence naming ``option``."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{option} {device!r} is not a device name; use cuda, cuda:1 or cpu") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{option} {str(device)!r} cannot run the models; use cuda, cuda:1 or cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {device} asked for CUDA, but torch {torch.__version__} sees no CUDA GPU here; "
                             "use cpu (hours for the 14B models) or run on a GPU machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_gpu_count(count: int, option: str = "--gpus") -> None:
    """Refuse a GPU count below 1 or above the CUDA devices this process sees, in one sentence."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 1:
        raise ValueError(f"{option} must be at least 1, got {count}")
    if count > have:
        seen = f"this machine has {have}" if have else f"torch {torch.__version__} sees none here"
        raise ValueError(f"{option} {count} asks for {count} CUDA GPUs, but {seen}; use at most {have}")


def free_cuda_bytes(device: torch.device) -> int:
    """Free memory on a CUDA device for this process: what the driver reports plus what PyTorch caches unused,
    capped by `torch.cuda.set_per_process_memory_fraction` when one is set."""
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    available = free + torch.cuda.memory_reserved(device) - allocated
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    # a fraction can only have been set once CUDA is initialised (and asking earlier would initialise it)
    if get_fraction is None or not torch.cuda.is_initialized():
        fraction = 1.0
    else:
        fraction = get_fraction(device.index if device.index is not None else torch.cuda.current_device())
    if fraction < 1.0:
        available = min(available, int(fraction * total) - allocated)
    return max(0, available)


def warm_up_in_background(device: torch.device) -> Optional[threading.Thread]:
    """Start the one-off setup a process pays before its first CUDA work (the CUDA context, importing Triton) in
    a background thread, so that it overlaps reading the model files instead of delaying the first stage."""
    if device.type != "cuda":
        return None

    def work():
        with contextlib.suppress(Exception):  # the run itself reports any problem, in its own words
            torch.empty(1, device=device)
            from .kernels import triton_runnable

            triton_runnable()

    thread = threading.Thread(target=work, name="turbowan-warm-up", daemon=True)
    thread.start()
    return thread


def cpu_count_available() -> int:
    """CPUs this process may use: its affinity mask (taskset, cpusets), capped by a cgroup v2 CPU quota."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with contextlib.suppress(OSError, ValueError):
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            count = min(count, max(1, int(quota) // int(period)))
    return count


def set_cpu_threads() -> None:
    """For a CPU run: no more torch threads than CPUs this process may use (torch counts the whole machine's
    cores, and threads over the quota spin against each other). OMP_NUM_THREADS, when set, wins: several runs
    at once should split the cores with it (README)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    threads = min(torch.get_num_threads(), cpu_count_available())
    torch.set_num_threads(threads)
    logging.getLogger("turbowan").info("turbowan: %d CPU threads (set OMP_NUM_THREADS to change)", threads)
