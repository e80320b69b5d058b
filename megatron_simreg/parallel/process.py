"""Starting the process group: a free rendezvous port and ``init_process_group`` for any launch mode."""

from __future__ import annotations

import os
import random
import socket

import torch
import torch.distributed as dist


LOWEST_PORT = 10000


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections (Linux; 0 when unknown)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing uses now, for single-machine rendezvous.

    Rank 0 binds it seconds later, after its imports. A port from the kernel's ephemeral range can meanwhile be given
    to any outgoing connection (gloo opens many), which failed a rendezvous with EADDRINUSE once in about 300 on a
    loaded 2-core machine; below that range only another caller of this function could take it. Falls back to a port
    the kernel picks when the range's lower end is unknown or leaves no room."""
    low = _ephemeral_low()
    if low > LOWEST_PORT + 1000:
        pick = random.SystemRandom()  # not the seeded global generator: concurrent callers must not agree
        for _ in range(64):
            port = pick.randrange(LOWEST_PORT, low)
            if _bindable(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join the launcher's process group (NCCL on GPU, gloo on CPU), or make a group of one when started by hand."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def shutdown_distributed() -> None:
    """Wait for every rank, then destroy the default process group (a no-op when there is none)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
