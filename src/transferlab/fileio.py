"""File writing: never a half-written file, never a bare NaN, never a nameless error.

Every file transferlab writes (checkpoints, the results JSON, the plot, the journal) goes
through `atomic_open`: the bytes go to a temporary file in the same directory, are flushed
and fsync'ed, and only then is the temporary file renamed onto the target with
`os.replace` (a rename within one file system is atomic). A crash or an exception
mid-write leaves an earlier file at the target byte-identical.

    with atomic_open("run.npz") as f:      # binary by default; "w" for text
        np.savez(f, **arrays)
    write_json_atomic("results.json", {"results": [...]})

A process killed mid-write (kill -9, power loss) cannot remove its temporary file. The
name says whose it is, `<target>.<pid>.<8 hex>.tmp`, so the next start removes the
leftovers of dead processes (`remove_stale_temporaries`) and never a live writer's.

Docs: docs/checkpoints.md#atomic-writes.
"""
from __future__ import annotations

import json
import math
import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_open", "write_json_atomic", "json_safe", "remove_stale_temporaries",
           "TEMP_RE", "OutputError", "check_writable"]

# <target>.<pid>.<8 hex>.tmp: the pid of the writer, so a leftover of a dead one is known
TEMP_RE = re.compile(r"^(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


class OutputError(OSError):
    """A file we must write cannot be written; the message names the path and the knob."""


def _temp_name(path: str) -> str:
    return f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


@contextmanager
def atomic_open(path, mode: str = "wb"):
    """Write `path` whole or not at all: every file transferlab writes goes through here.

    Yields a file opened on a temporary name in the same directory (so the rename stays
    atomic). When the block ends without error the bytes are flushed and fsync'ed and only
    then renamed onto `path`; on any exception (KeyboardInterrupt too) the temporary file
    is removed and an earlier file at `path` stays byte-identical.
    """
    path = os.fspath(path)
    tmp = _temp_name(path)
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


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # we are starting: none of our own writes is under way yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temporaries(folder) -> list[str]:
    """Delete the temporary files that killed writers left in `folder`; return their paths.

    Only files named as atomic_open names them, and only when the writer's process is
    gone: a live writer's temporary file (another experiment in the same folder) is kept.
    """
    removed = []
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for name in names:
        match = TEMP_RE.match(name)
        if match and not _alive(int(match["pid"])):
            path = os.path.join(folder, name)
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass  # removed by someone else meanwhile
    return removed


def check_writable(path, knob: str, directory: bool = False) -> None:
    """Fail now, before any training, if `path` cannot be written later.

    Creates the parent folders (or the folder itself with directory=True) and writes and
    removes a probe file named like atomic_open's temporaries. Raises OutputError naming
    the path and the knob that set it: empty, a directory where a file is wanted, a
    parent that is a file, no permission, a read-only or pseudo file system.
    """
    text = os.fspath(path)
    if text == "":
        raise OutputError(f"{knob} is empty: name a file")
    path = Path(text)
    folder = path if directory else path.parent
    if not directory and path.is_dir():
        raise OutputError(f"{knob}: {text} is a directory, not a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = _temp_name(str(folder / ".write-test"))
        with open(probe, "x"):
            pass
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"{knob}: cannot write {text}: {err.strerror or err}") from None


def json_safe(obj, reason: str = "not a number (NaN or infinite): undefined on this data"):
    """A copy of `obj` in which every non-finite float is None and, when it sat in a dict
    under key k, a sibling "k_null_reason" says why. Strict JSON has no NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out[key] = json_safe(value, reason)
            if isinstance(value, float) and not math.isfinite(value):
                out[f"{key}_null_reason"] = f"{value!r} is {reason}"
        return out
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, reason) for v in obj]
    return obj


def write_json_atomic(path, obj, knob: str | None = None) -> None:
    """Write `obj` as strict JSON (NaN -> null + reason, json_safe) through `atomic_open`,
    creating the parent folders. An OSError names the path (and `knob`, when given)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "w") as f:
            json.dump(json_safe(obj), f, indent=1, allow_nan=False)
    except OSError as err:
        if isinstance(err, OutputError):
            raise
        where = f"{knob}: " if knob else ""
        out = OutputError(f"{where}cannot write {path}: {err.strerror or err}")
        out.errno = err.errno
        raise out from err
