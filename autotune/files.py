"""Atomic JSON and text files: write a temporary file beside the target, fsync, rename over it."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_json_atomically(path: Path, data: object) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text_atomically(path: Path, text: str) -> None:
    path = Path(path)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as tmp:
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
