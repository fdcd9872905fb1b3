"""How the parent of ``worker run --processes N`` and its children speak about stopping.

A stop sent to every process at once (``scancel``, systemd's ``KillMode=control-group``) reaches
a child twice, directly and forwarded by the parent. So a child (``FLEET_CHILD_VARIABLE`` set in
its environment) drains on any number of SIGTERM and SIGINT, and forces only on
``FORCE_SIGNAL``, which only the parent sends, on its own second stop.
"""
from __future__ import annotations

import signal

FLEET_CHILD_VARIABLE = "ANTENNA_WORKER_FLEET_CHILD"
FORCE_SIGNAL = signal.SIGUSR2
