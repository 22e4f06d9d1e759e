"""fileio.py: a file is written whole or not at all.

atomic_open's failure paths under a checkpoint (np.savez, os.fsync and os.replace failing
in turn) are tested in test_checkpoint.py; here the JSON writer the runner uses.
"""
import json
import os

import pytest

from transferlab import fileio
from transferlab.fileio import write_json_atomic


def test_write_json_atomic_round_trips(tmp_path):
    path = tmp_path / "deep" / "results.json"
    write_json_atomic(path, {"results": [{"x": 1.5}]})
    assert json.loads(path.read_text()) == {"results": [{"x": 1.5}]}
    assert os.listdir(path.parent) == ["results.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not 0600


def dump_half_then_fail(obj, f, **kwargs):
    f.write(json.dumps(obj, **kwargs)[:20])  # part of the new file is written ...
    f.flush()
    raise OSError("disk full")  # ... then the write fails


def test_a_failing_write_leaves_the_earlier_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"results": ["earlier"]})
    earlier = path.read_bytes()
    monkeypatch.setattr(fileio.json, "dump", dump_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(path, {"results": ["later"] * 100})
    assert path.read_bytes() == earlier
    assert os.listdir(tmp_path) == ["results.json"]
