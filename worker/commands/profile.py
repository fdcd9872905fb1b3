"""Memory profiling of a worker run with memray (``worker run --memray OUT.bin``).

memray records the process it runs in. Loader workers are separate processes forked from the
loader's fork server (a clean interpreter this process starts, not a fork of it), so memray's
``follow_fork`` does not reach them. To see a loader worker's allocations, run the same plan with
``AMI_ANTENNA_API_DATALOADER_NUM_WORKERS=0``: the loader's code (reserve, download, decode) then
runs in the recorded main process. See docs/benchmarks.md ("memray").
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


@contextmanager
def memray_tracking(path: str | Path, *, native: bool = False) -> Iterator[None]:
    """Record allocations of this process into ``path`` (overwritten) while the block runs."""
    import memray

    path = Path(path)
    path.unlink(missing_ok=True)
    log.info("memray: recording allocations of pid-local threads into %s (native traces %s)",
             path, "on" if native else "off")
    with memray.Tracker(path, native_traces=native, trace_python_allocators=False):
        yield
    log.info("memray: recording written to %s (memray stats %s)", path, path)
