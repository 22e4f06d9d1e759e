"""File writing: never a half-written file.

Every file transferlab writes (checkpoints, the results JSON, the plot) goes through
`atomic_open`: the bytes go to a temporary file in the same directory, are flushed and
fsync'ed, and only then is the temporary file renamed onto the target with `os.replace`
(a rename within one file system is atomic). A crash or an exception mid-write leaves
an earlier file at the target byte-identical.

    with atomic_open("run.npz") as f:      # binary by default; "w" for text
        np.savez(f, **arrays)
    write_json_atomic("results.json", {"results": [...]})

Docs: docs/checkpoints.md#atomic-writes.
"""
from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_open", "write_json_atomic"]


@contextmanager
def atomic_open(path, mode: str = "wb"):
    """Write `path` whole or not at all: every file transferlab writes goes through here.

    Yields a file opened on a temporary name in the same directory (so the rename stays
    atomic). When the block ends without error the bytes are flushed and fsync'ed and only
    then renamed onto `path`; on any exception (KeyboardInterrupt too) the temporary file
    is removed and an earlier file at `path` stays byte-identical.
    """
    path = os.fspath(path)
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, mode.replace("w", "x")) as f:  # "x": never reuse an existing name
            yield f
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path, obj) -> None:
    """Write `obj` as JSON through `atomic_open`, creating the parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=True)
