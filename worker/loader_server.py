"""Imported by the loader's fork server only (``ingest.FORK_SERVER_PRELOAD``), never elsewhere.

Importing ``worker.ingest`` loads what every loader worker needs (torch, the JPEG decoder,
requests) once, in the server; each worker forked from it starts with them. The server then
ignores SIGTERM (multiprocessing's fork server already ignores SIGINT): supervisor's stopasgroup
and similar send SIGTERM to the whole process group, and the server must outlive the main
process's drain so a rebuilt loader can still fork. It exits when the main process does.
"""
import signal

import worker.ingest  # noqa: F401  (the import is the point)

signal.signal(signal.SIGTERM, signal.SIG_IGN)
