"""FolderLock: one holder at a time, the holder's PID named, released when the process dies."""

import os
import subprocess
import sys
import textwrap

import pytest

from engine.errors import InputError
from engine.run.lock import LOCK_NAME, FolderLock

HOLD = textwrap.dedent("""
    import sys, time
    from engine.run.lock import FolderLock
    FolderLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def test_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock = FolderLock(tmp_path)
        assert lock.holder() == holder.pid
        with pytest.raises(InputError, match=f"in use by another run \\(PID {holder.pid}\\)"):
            lock.acquire()
    finally:
        holder.kill()  # kill -9: the kernel drops the lock with the process
        holder.wait()
    with FolderLock(tmp_path) as lock:
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert FolderLock(tmp_path).holder() is None


def test_probing_a_free_folder_creates_nothing(tmp_path):
    assert FolderLock(tmp_path).holder() is None
    assert list(tmp_path.iterdir()) == []
