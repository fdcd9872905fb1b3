"""Ballast processes: real children that hold memory, files and /dev/shm, for measuring.

Used by ``python -m watchdog.sampler --measure`` and by the tests. Children are started with
the ``spawn`` method (a fresh interpreter, like a loader worker that shares nothing by fork), so
their memory is their own and PSS growth equals what they touched.
"""
from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event

_READY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class BallastSpec:
    """What each child holds: ``child_bytes`` of touched memory, ``open_files`` descriptors on
    /dev/null, and the /dev/shm file ``shm_name`` (None: none) mapped, held open, or both
    (``shm_mode`` ``map``, ``fd`` or ``both``)."""

    child_bytes: int = 0
    open_files: int = 0
    shm_name: str | None = None
    shm_mode: str = "map"


def _attach_shm(spec: BallastSpec) -> tuple[int | None, mmap.mmap | None]:
    # Plain os.open + mmap rather than SharedMemory: on Python < 3.13 attaching registers the
    # block with the resource tracker, which would unlink it when the child exits.
    if spec.shm_name is None:
        return None, None
    fd = os.open(f"/dev/shm/{spec.shm_name.lstrip('/')}", os.O_RDWR)
    mapping = mmap.mmap(fd, 0) if spec.shm_mode in ("map", "both") else None
    if spec.shm_mode == "map":
        os.close(fd)
        return None, mapping
    return fd, mapping


def _hold(spec: BallastSpec, ready: Event, release: Event) -> None:
    # Multiplying a one-byte bytes object writes every page, so all of it is resident.
    ballast = b"\x01" * spec.child_bytes
    files = [os.open(os.devnull, os.O_RDONLY) for _ in range(spec.open_files)]
    shm_fd, mapping = _attach_shm(spec)
    ready.set()
    release.wait()
    del ballast
    for fd in files + ([shm_fd] if shm_fd is not None else []):
        os.close(fd)
    if mapping is not None:
        mapping.close()


@contextlib.contextmanager
def hold_children(
    count: int,
    *,
    child_bytes: int = 0,
    open_files: int = 0,
    shm_name: str | None = None,
    shm_mode: str = "map",
) -> Iterator[list[BaseProcess]]:
    """Start ``count`` spawned children holding a ``BallastSpec`` each; yield them once all hold.

    On exit the children are released and joined (killed after 10 s). Raises TimeoutError when
    a child is not ready within 30 s.
    """
    context = multiprocessing.get_context("spawn")
    spec = BallastSpec(child_bytes, open_files, shm_name, shm_mode)
    release = context.Event()
    children: list[BaseProcess] = []
    try:
        for _ in range(count):
            ready = context.Event()
            child = context.Process(target=_hold, args=(spec, ready, release), daemon=True)
            child.start()
            children.append(child)
            if not ready.wait(_READY_TIMEOUT_S):
                raise TimeoutError(f"ballast child {child.pid} not ready in {_READY_TIMEOUT_S} s")
        yield children
    finally:
        release.set()
        for child in children:
            child.join(10.0)
            if child.is_alive():
                child.kill()
                child.join()
