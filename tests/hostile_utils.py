"""Helpers of the hostile-input suites: the one-line error check, a snapshot of a folder tree (to
prove nothing was replaced or left half-written), the special files a careless or hostile user
leaves around, and a deadline that turns a hang into a failure."""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import stat
from pathlib import Path


def one_error(err: str, needle: str | None = None) -> str:
    """Exactly one `vitmoe: error:` line (holding `needle`), no traceback; other lines may only be
    vitmoe's warnings or notes."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("vitmoe: error: ")]
    assert "Traceback" not in err, err
    assert len(errors) == 1, err
    assert all(ln.startswith(("vitmoe: error: ", "vitmoe: warning: ", "note: ")) for ln in lines), err
    if needle is not None:
        assert needle in errors[0], errors[0]
    return errors[0]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root` (links not followed): its kind and, for regular files, a digest."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                out[str(p.relative_to(root))] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            elif stat.S_ISLNK(st.st_mode):
                out[str(p.relative_to(root))] = ("link", os.readlink(p))
            else:
                out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode),)
    return out


class Hang(Exception):
    """A call that should have returned at once did not (it would hang a user's command)."""


@contextlib.contextmanager
def deadline(seconds: int):
    """Raise Hang in the main thread after `seconds` (a blocked open of a FIFO is interrupted too)."""
    def fire(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
