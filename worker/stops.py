"""How the parent of ``worker run --processes N`` and its children speak about stopping.

A stop sent to every process at once (``scancel``, systemd's ``KillMode=control-group``) reaches
a child twice, directly and forwarded by the parent. So a child (``FLEET_CHILD_VARIABLE`` set in
its environment) drains on any number of SIGTERM and SIGINT, and forces only on
``FORCE_SIGNAL``, which only the parent sends, on its own second stop.
"""
from __future__ import annotations

import os
import signal

FLEET_CHILD_VARIABLE = "ANTENNA_WORKER_FLEET_CHILD"
FORCE_SIGNAL = signal.SIGUSR2


def process_exists(pid: int) -> bool:
    """Whether ``pid`` names a process (another user's included): how a loader worker watches the
    main process, and a fleet parent tells the folders of parents still running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
