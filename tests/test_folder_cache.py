"""One builder per image-folder cache: processes that start on a fresh folder at once build it once
(the others wait), a crashed build does not block the next, and `vitmoe train --gpu 2` on a fresh
folder decodes it once."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_SETS
from test_folder_dataset import make_tree

from vitmoe.data import folder as fd


def _load_counting(root: str, builds: str, start: str, slow_s: float) -> None:
    """prepare_folder in a fresh process, every decode slowed (so the others arrive mid-build) and
    every build of the cache noted in `builds`."""
    real_build, real_decode = fd._build, fd.decode_image

    def build(*a, **k):
        with open(builds, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real_build(*a, **k)

    def decode(*a, **k):
        time.sleep(slow_s)
        return real_decode(*a, **k)

    fd._build, fd.decode_image = build, decode
    while not Path(start).exists():  # all start together
        time.sleep(0.005)
    data = fd.prepare_folder(f"folder:{root}")
    assert len(data.train.labels) == 12 and len(data.test.labels) == 6


def test_processes_starting_together_build_the_cache_once(tmp_path):
    root = make_tree(tmp_path / "imgs")
    builds, start = tmp_path / "builds", tmp_path / "start"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_load_counting, args=(str(root), str(builds), str(start), 0.05)) for _ in range(3)]
    for p in procs:
        p.start()
    time.sleep(2)  # let them import and wait at the start line
    start.touch()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    builders = builds.read_text().split()
    assert len(builders) == 1, builders
    manifest = json.loads((root / ".vitmoe-cache" / "s32" / "manifest.json").read_text())
    assert manifest["built_by"]["pid"] == int(builders[0])


def test_a_crashed_build_does_not_block_the_next(tmp_path):
    root = make_tree(tmp_path / "imgs")
    builds, start = tmp_path / "builds", tmp_path / "start"
    start.touch()
    crashing = mp.get_context("spawn").Process(target=_load_counting, args=(str(root), str(builds), str(start), 0.5))
    crashing.start()
    cache = root / ".vitmoe-cache" / "s32"
    deadline = time.time() + 60
    while not list(cache.glob(".all.*.npy")):  # mid-build: it holds the lock and has written its temp array
        assert time.time() < deadline and crashing.is_alive()
        time.sleep(0.02)
    os.kill(crashing.pid, signal.SIGKILL)
    crashing.join(10)
    assert not (cache / "manifest.json").exists() and list(cache.glob(".all.*.npy"))
    fd._MEMO.clear()
    t0 = time.monotonic()
    data = fd.prepare_folder(f"folder:{root}")  # takes the dead builder's lock at once and builds
    assert time.monotonic() - t0 < 30 and len(data.train.labels) == 12
    assert json.loads((cache / "manifest.json").read_text())["built_by"]["pid"] == os.getpid()
    assert not list(cache.glob(".all.*.npy")), "the crashed build's temporary array was left behind"


@pytest.mark.slow
def test_two_processes_on_a_fresh_folder_decode_it_once(tmp_path):
    root = make_tree(tmp_path / "imgs", per_class=8)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "vitmoe", "train", "--dataset", f"folder:{root}", "--model", "vit",
                             "--gpu", "2", "--epochs", "1", "--batch", "8", "--out", str(out), "--set", "progress=false",
                             *TINY_SETS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    # The launcher (this pid: vitmoe re-executes itself in place) decoded the folder before starting the
    # workers, which read its cache: a worker building it again would have written its own pid.
    manifest = json.loads((root / ".vitmoe-cache" / "s32" / "manifest.json").read_text())
    assert manifest["built_by"]["pid"] == proc.pid
    assert "waiting for" not in err
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
