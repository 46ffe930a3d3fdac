"""Hostile and careless output paths: every command that writes, against every kind of target a user
can point it at (a run's own files, its checkpoints, an existing file without --force, a device
node, a FIFO, a symbolic link, a path under a file, a system folder). Generated as commands x
targets x --force; each case must end in one `vitmoe: error:` line (exit 2) before any work, with
every file under the test folder byte-identical afterwards (nothing replaced, nothing half-written)."""
from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import pytest
from conftest import TINY, TINY_SETS
from hostile_utils import deadline, one_error, snapshot

import vitmoe
from vitmoe.cli.main import main

PROBE = "vitmoe-hostile-probe"  # a name no system holds: created only if the policy failed (then removed)


@pytest.fixture
def world(tiny_run, tmp_path, capsys):
    """A copy of the tiny run, an MoE model file, a dense exportable one, and a victim file."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    moe = tmp_path / "moe.safetensors"
    vitmoe.save_model(vitmoe.create_model("switch_vit", num_experts=2, **TINY), moe)
    dense = tmp_path / "dense.safetensors"
    vitmoe.save_model(vitmoe.create_model("vit", head="linear", **TINY), dense)
    (tmp_path / "victim.txt").write_text("keep me")
    capsys.readouterr()
    return {"tmp": tmp_path, "run": run, "moe": moe, "dense": dense, "victim": tmp_path / "victim.txt"}


def _device(tmp: Path) -> Path:
    """A character device node of our own (the one /dev/null is), never the system's."""
    dev = tmp / "device.safetensors"
    try:
        os.mknod(dev, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except (PermissionError, OSError):
        pytest.skip("cannot make a device node here")
    return dev


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _link(w) -> Path:
    link = w["tmp"] / "link.safetensors"
    link.symlink_to(w["victim"])
    return link


# target kind -> (make(world) -> path, refused even with --force, needle)
FILE_TARGETS = {
    "run config": (lambda w: w["run"] / "config.yaml", True, "would replace its own config.yaml of the run"),
    "run summary": (lambda w: w["run"] / "summary.json", True, "would replace its own summary.json"),
    "run checkpoint": (lambda w: w["run"] / "checkpoints" / "epoch-0001" / "model.safetensors", True,
                       "its checkpoints/ of the run"),
    "shadowing name in a run": (lambda w: w["run"] / "model.safetensors", True, "would replace its own model.safetensors"),
    "existing file": (lambda w: w["victim"], False, "already exists: pass --force"),
    "device node": (lambda w: _device(w["tmp"]), True, "a character device"),
    "fifo": (lambda w: _fifo(w["tmp"] / "fifo.safetensors"), True, "a FIFO"),
    "symlink": (_link, True, "a symbolic link"),
    "under a file": (lambda w: w["victim"] / "out.safetensors", True, "victim.txt is a file, not a folder"),
    "system folder": (lambda w: Path("/usr") / f"{PROBE}.safetensors", True, "system folder /usr"),
    "filesystem root": (lambda w: Path("/") / f"{PROBE}.safetensors", True, "system folder /"),
}
FILE_COMMANDS = {
    "merge": lambda w, out: ["merge", str(w["moe"]), str(out)],
    "upcycle": lambda w, out: ["upcycle", str(w["dense"]), str(out), "--experts", "2"],
}


def _cases(commands, targets):
    for command in commands:
        for kind, (_, always, _) in targets.items():
            for force in ((False, True) if always else (False,)):
                yield pytest.param(command, kind, force, id=f"{command}-{kind.replace(' ', '_')}{'-force' if force else ''}")


def _refused(argv, w, capsys, needle, probes=()):
    before = snapshot(w["tmp"])
    try:
        with deadline(60):
            code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, err
        one_error(err, needle)
        assert snapshot(w["tmp"]) == before  # nothing replaced, nothing new, nothing half-written
        assert w["victim"].read_text() == "keep me"
        assert not [p for p in probes if os.path.lexists(p)]
    finally:
        for p in probes:  # only ever there if the policy failed
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.lexists(p):
                os.unlink(p)


@pytest.mark.parametrize("command, kind, force", list(_cases(FILE_COMMANDS, FILE_TARGETS)))
def test_file_outputs_refuse_hostile_targets(command, kind, force, world, capsys):
    make, _, needle = FILE_TARGETS[kind]
    target = make(world)
    argv = FILE_COMMANDS[command](world, target) + (["--force"] if force else [])
    _refused(argv, world, capsys, needle, probes=[target] if PROBE in str(target) else [])


def test_a_file_output_is_never_the_input(world, capsys):
    _refused(["merge", str(world["moe"]), str(world["moe"]), "--force"], world, capsys, "is the command's input")


def test_force_replaces_an_ordinary_file_and_only_that(world, capsys):
    out = world["tmp"] / "merged.safetensors"
    out.write_bytes(b"an older merge")
    assert main(["merge", str(world["moe"]), str(out), "--force"]) == 0
    assert not vitmoe.load_model(out).config.is_moe
    assert sorted(p.name for p in world["tmp"].iterdir() if p.name.startswith(".")) == []  # no temp file left


# Folder commands: (argv for output folder OUT, a file name it writes there, whether --force exists)
FOLDER_COMMANDS = {
    "export": (lambda w, out: ["export", str(w["dense"]), str(out)], "config.json", True),
    "analyze": (lambda w, out: ["analyze", str(w["run"]), "--out", str(out), "--batch", "1000"], "analysis.json", True),
    "eval curve": (lambda w, out: ["eval", str(w["run"]), "--capacity-factors", "1", "--out", str(out)],
                   "capacity.json", True),
    "report": (lambda w, out: ["report", str(w["run"]), "--out", str(out)], "results.md", True),
    "sweep": (lambda w, out: ["sweep", "--out", str(out), "--epochs", "1", "--dataset", "digits", "--seeds", "1",
                              "--dry-run"], None, False),
    "train": (lambda w, out: ["train", "--dataset", "digits", "--epochs", "1", "--out", str(out), *TINY_SETS],
              None, True),
    "demo": (lambda w, out: ["demo", "--epochs", "1", "--out", str(out)], None, True),
}
FOLDER_TARGETS = {
    "run checkpoints": (lambda w: w["run"] / "checkpoints" / "epoch-0001", True, "checkpoints/ of the run"),
    "a file": (lambda w: w["victim"], True, "victim.txt"),
    "under a file": (lambda w: w["victim"] / "out", True, "victim.txt is a file, not a folder"),
    "system folder": (lambda w: Path("/usr/share") / PROBE, True, "system folder /usr"),
    "existing output": (lambda w: w["tmp"] / "out", False, "already exists: pass --force"),
    "fifo output": (lambda w: w["tmp"] / "out", True, "a FIFO"),
}


def _folder_cases():
    for command, (_, name, has_force) in FOLDER_COMMANDS.items():
        for kind, (_, always, _) in FOLDER_TARGETS.items():
            if kind in ("existing output", "fifo output") and name is None:
                continue  # sweep, train and demo own their folders (rundir's and their own rules)
            for force in ((False, True) if always and has_force else (False,)):
                yield pytest.param(command, kind, force,
                                   id=f"{command.replace(' ', '_')}-{kind.replace(' ', '_')}{'-force' if force else ''}")


@pytest.mark.parametrize("command, kind, force", list(_folder_cases()))
def test_folder_outputs_refuse_hostile_targets(command, kind, force, world, capsys, monkeypatch):
    make_argv, name, _ = FOLDER_COMMANDS[command]
    make, _, needle = FOLDER_TARGETS[kind]
    target = make(world)
    if kind == "existing output":
        target.mkdir()
        (target / name).write_text("an earlier result")
    elif kind == "fifo output":
        target.mkdir()
        _fifo(target / name)
    if command == "demo":
        monkeypatch.setattr("vitmoe.training.train", _no_training)
    if command == "train":
        monkeypatch.setattr("vitmoe.data.load_dataset", _no_training)
    argv = make_argv(world, target) + (["--force"] if force else [])
    _refused(argv, world, capsys, needle, probes=[target] if PROBE in str(target) else [])


def _no_training(*a, **k):
    raise AssertionError("training started before the output path was refused")


def test_export_into_a_run_would_shadow_its_checkpoints(world, capsys):
    # RUN/model.safetensors would make `vitmoe eval RUN` read it instead of the run's checkpoints.
    _refused(["export", str(world["dense"]), str(world["run"]), "--force"], world, capsys,
             "would replace its own config.json of the run")


def test_export_never_writes_into_the_filesystem_root(world, capsys):
    from vitmoe.cli.export import outputs

    probes = [Path("/") / name for name in outputs("hf")]
    if any(os.path.lexists(p) for p in probes):
        pytest.skip("this machine has such a file in /")
    _refused(["export", str(world["dense"]), "/", "--force"], world, capsys, "system folder /", probes=probes)


def test_predict_out_follows_the_policy(world, capsys):
    images = world["tmp"] / "images"
    images.mkdir()
    for target, needle in ((world["run"] / "summary.json", "would replace its own summary.json"),
                           (_fifo(world["tmp"] / "p.csv"), "a FIFO"),
                           (world["run"] / "checkpoints" / "p.csv", "its checkpoints/ of the run")):
        _refused(["predict", str(world["run"]), str(images), "--out", str(target), "--force"], world, capsys, needle)


def test_train_refuses_the_filesystem_root_and_system_folders(world, capsys, no_data):
    for out, needle in (("/", "filesystem root"), ("/etc", "system folder /etc"), (f"/usr/{PROBE}", "system folder /usr")):
        _refused(["train", "--dataset", "digits", "--out", out, *TINY_SETS], world, capsys, needle,
                 probes=[out] if PROBE in out else [])


def test_analysis_of_a_checkpoint_file_goes_to_the_run_not_into_its_checkpoints(world, capsys):
    model = world["run"] / "checkpoints" / "epoch-0001" / "model.safetensors"
    before = snapshot(world["run"] / "checkpoints")
    assert main(["eval", str(model), "--capacity-factors", "1", "2"]) == 0
    assert (world["run"] / "analysis" / "capacity.json").is_file()
    assert snapshot(world["run"] / "checkpoints") == before
    assert main(["eval", str(world["run"]), "--capacity-factors", "1"]) == 2  # the curve exists now
    one_error(capsys.readouterr().err, "capacity.json already exists: pass --force")


# -- a full disk while writing: one line, the previous file kept, no temporary file left ----------------
def test_full_disk_while_writing_a_model_is_one_line_and_leaves_nothing(world, capsys, monkeypatch):
    out = world["tmp"] / "merged.safetensors"
    out.write_bytes(b"the previous merge")

    def fill_disk(state, tmp, metadata=None):
        Path(tmp).write_bytes(b"\0" * 1000)  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("vitmoe.models.io.save_file", fill_disk)
    assert main(["merge", str(world["moe"]), str(out), "--force"]) == 2
    one_error(capsys.readouterr().err, f"no space left on device writing {out}")
    assert out.read_bytes() == b"the previous merge"
    assert not [p for p in world["tmp"].iterdir() if p.name.startswith(".")]
