"""Crash-safe, verifiable training checkpoints that load without running code.

Layout of `RUN/checkpoints/`:

    epoch-0005/model.safetensors   weights + model config (vitmoe.save_model; loadable by vitmoe.load_model)
    epoch-0005/state.pt            optimizer, scheduler, RNG states, epoch, step, best accuracy, history
    epoch-0005/manifest.json       size and sha256 of both files (written last)
    epoch-0005/ema.safetensors     with ema_decay: the weights' EMA as a model file (recorded in the manifest)
    latest                         text file naming the newest complete checkpoint directory
    best                           text file naming the checkpoint with the best test accuracy

A checkpoint is written into a hidden temporary directory (`.tmp-*`): the weights, the state, then
the manifest, each fsynced; the files are read back and checked against the manifest, the directory
is renamed into place, and only then is `latest` atomically replaced (temp file + os.replace).
Killing the process at any moment leaves `latest` naming a complete checkpoint; leftover `.tmp-*`
directories are ignored and removed by the next save.

Reading never executes code: `state.pt` holds only tensors, numbers, strings, lists, tuples and
dicts (the RNG states of numpy and Python are stored as tensors and ints) and is loaded with
`torch.load(weights_only=True)` (`safe_state`). A checkpoint is used only when it verifies (`verify`:
its manifest's sizes and hashes; one written before manifests existed: both files present and
loadable); readers take the newest one that does and say which ones they skipped. A full disk is
one CheckpointError naming the directory, the free space and the size needed; the previous
checkpoint stays `latest`.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ...fileio import atomic_write_text, dir_mode, disk_full_message, is_disk_full, kind_of
from ...readers import read_bytes
from ...validation import show
from ...models import save_model
from ...rundir.layout import (BEST, CHECKPOINT_DIR, EPOCH_DIR_RE, LATEST, all_epoch_dirs, epoch_dir_name,  # noqa: F401
                              has_checkpoint)
from .safe_state import (STATE_FILE, CheckpointError, first_line, load_state, plain_state, rng_state,  # noqa: F401
                         set_rng_state)
from .verify import (CHECKPOINT_FILES, EMA_FILE, MANIFEST_FILE, MANIFEST_FORMAT, MODEL_FILE,  # noqa: F401
                     OPTIONAL_FILES, HashingFile, check_entry, check_safetensors, checkpoint_problem, file_digest,
                     read_manifest, verify_checkpoint)

# Entries a training state must have for `vitmoe train --resume`.
RESUME_KEYS = ("epoch", "step", "best_acc", "best_epoch", "optimizer", "scheduler", "rng")


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named directory that follows the umask (tempfile.mkdtemp would make it 0700)."""
    while True:
        path = parent / f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            path.mkdir(mode=dir_mode())
            return path
        except FileExistsError:
            continue


# -- finding checkpoints -----------------------------------------------------------------------------
def _write_pointer(ckdir: Path, name: str, target: str) -> None:
    atomic_write_text(ckdir / name, target + "\n")


def _read_pointer(ckdir: Path, name: str) -> str | None:
    try:  # a pointer is one short line: a FIFO or a huge file planted there is no pointer
        return read_bytes(ckdir / name, "checkpoint pointer", limit=4096).decode("utf-8").strip() or None
    except (OSError, ValueError):  # PathError and UnicodeDecodeError are ValueErrors
        return None


def _complete(d: Path) -> bool:
    return (d / MODEL_FILE).is_file() and (d / STATE_FILE).is_file()


def epoch_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories (both files present, not verified), oldest first."""
    return [p for p in all_epoch_dirs(run_dir) if _complete(p)]


def candidates(run_dir: str | os.PathLike, which: str = "latest") -> list[Path]:
    """Checkpoint directories in the order readers try them: the one `latest` (or `best`) names,
    then every other from the newest."""
    ckdir = Path(run_dir) / CHECKPOINT_DIR
    dirs = all_epoch_dirs(run_dir)
    target = _read_pointer(ckdir, which)
    first = [ckdir / target] if target and EPOCH_DIR_RE.match(target) and (ckdir / target).is_dir() else []
    return first + [p for p in reversed(dirs) if p not in first]


def pointer_problem(run_dir: str | os.PathLike, which: str) -> str | None:
    """Why the `which` pointer of a run that has checkpoints names none of them (missing, unreadable,
    naming a folder that is gone), or None when it names an existing checkpoint folder. Readers then
    fall back to the newest checkpoint that verifies, and say so (a `best` that silently became the
    latest would report the wrong model)."""
    ckdir = Path(run_dir) / CHECKPOINT_DIR
    if not all_epoch_dirs(run_dir):
        return None
    target = _read_pointer(ckdir, which)
    if target is None:
        return f"{ckdir / which} is missing or unreadable"
    if not (EPOCH_DIR_RE.match(target) and (ckdir / target).is_dir()):
        return f"{ckdir / which} names {show(target)}, which is not a checkpoint folder of the run"
    return None


def _no_usable(run_dir, problems: list[str]) -> CheckpointError:
    more = f" ({len(problems) - 1} older checkpoint(s) fail too)" if len(problems) > 1 else ""
    return CheckpointError(f"no usable checkpoint in {Path(run_dir) / CHECKPOINT_DIR}: {problems[0]}{more}")


def find_checkpoint(run_dir: str | os.PathLike, which: str = "latest", files: Iterable[str] = CHECKPOINT_FILES,
                    log: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint whose `files` verify (trying `latest`/`best` first); each one skipped
    is reported through `log`. None when the run has no checkpoint; CheckpointError, naming the
    newest one's problem, when it has some and none verifies."""
    files, problems = tuple(files), []
    # `latest` falling back to the newest checkpoint is what it means; `best` falling back is not.
    pointer = pointer_problem(run_dir, which) if which != LATEST else None
    for d in candidates(run_dir, which):
        problem = checkpoint_problem(d, files)
        if problem is None:
            if log is not None:
                if pointer is not None:
                    log(f"{pointer}: using {d.name}, the newest checkpoint that verifies, instead of the {which} one")
                for p in problems:
                    log(f"skipped a checkpoint that does not verify: {p}; using {d.name}")
            return d
        problems.append(problem)
    if problems:
        raise _no_usable(run_dir, problems)
    return None


def latest_checkpoint(run_dir: str | os.PathLike, which: str = "latest", verify: bool = True,
                      files: Iterable[str] = CHECKPOINT_FILES) -> Path | None:
    """The checkpoint directory `latest` (or `best`) names, or else the newest one, that verifies
    (`verify=False`: that has both files); None when there is none."""
    if not verify:
        found = [d for d in candidates(run_dir, which) if _complete(d)]
        return found[0] if found else None
    try:
        return find_checkpoint(run_dir, which, files)
    except CheckpointError:
        return None


# -- writing -----------------------------------------------------------------------------------------
def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(
    run_dir: str | os.PathLike,
    epoch: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    metadata: dict[str, Any] | None = None,
    keep: int = 1,
    is_best: bool = False,
    model_state: dict[str, torch.Tensor] | None = None,
    extra_models: dict[str, tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, Any]]] | None = None,
) -> Path:
    """Write checkpoint `epoch-NNNN` atomically and verified, point `latest` (and `best`) at it,
    prune old ones.

    `model_state` replaces `model.state_dict()` (expert-parallel runs pass the gathered state).
    `extra_models`: {file name in OPTIONAL_FILES: (model, its state, metadata)}, e.g. the EMA.
    A full disk is a CheckpointError naming the directory, the free space and the size needed;
    the temporary files are removed and `latest` still names the previous checkpoint."""
    ckdir = Path(run_dir) / CHECKPOINT_DIR
    name = epoch_dir_name(epoch)
    previous = _read_pointer(ckdir, LATEST)
    try:
        ckdir.mkdir(parents=True, exist_ok=True)
        final = _write_checkpoint(ckdir, name, model, plain_state(state), metadata, model_state, extra_models or {})
        _write_pointer(ckdir, LATEST, name)
        if is_best:
            _write_pointer(ckdir, BEST, name)
    except BaseException as e:
        if not is_disk_full(e):
            raise
        needed = (_tensor_bytes(model_state if model_state is not None else model.state_dict()) + _tensor_bytes(state)
                  + sum(_tensor_bytes(extra[1]) for extra in (extra_models or {}).values()))
        kept = (f"the previous checkpoint {previous} is still the latest" if previous
                else "no earlier checkpoint exists")
        raise CheckpointError(f"{disk_full_message(f'checkpoint {name}', ckdir, needed)} (model and training "
                              f"state); {kept}. Free space, then resume with --resume {run_dir}") from e
    prune(run_dir, keep)
    return final


def _write_checkpoint(ckdir: Path, name: str, model: torch.nn.Module, state: dict[str, Any],
                      metadata: dict[str, Any] | None, model_state: dict[str, torch.Tensor] | None,
                      extra_models: dict[str, tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, Any]]]) -> Path:
    tmp = _make_temp_dir(ckdir, f".tmp-{name}-")
    try:
        recorded_files = {}
        for file, (m, m_state, m_meta) in [(MODEL_FILE, (model, model_state, metadata)), *extra_models.items()]:
            if file != MODEL_FILE and file not in OPTIONAL_FILES:
                raise ValueError(f"save_checkpoint: {file!r} is not one of the optional files {OPTIONAL_FILES}")
            save_model(m, tmp / file, metadata=m_meta, state_dict=m_state)
            check_safetensors(tmp / file)  # the file on disk is whole
            size, sha = file_digest(tmp / file)
            recorded_files[file] = {"size": size, "sha256": sha}
        with open(tmp / STATE_FILE, "wb") as raw:
            f = HashingFile(raw)
            torch.save(state, f)
            raw.flush()
            os.fsync(raw.fileno())
        manifest = {"format": MANIFEST_FORMAT, "files": {
            **recorded_files, STATE_FILE: {"size": f.size, "sha256": f.sha256.hexdigest()}}}
        with open(tmp / MANIFEST_FILE, "w") as m:  # last: a manifest means every file was written
            m.write(json.dumps(manifest, indent=1) + "\n")
            m.flush()
            os.fsync(m.fileno())
        # Read back what reached the disk: the state's bytes are what torch.save produced.
        recorded = read_manifest(tmp)
        for file in (MODEL_FILE, *extra_models):
            check_entry(tmp / file, recorded.get(file), hash_it=False)
        check_entry(tmp / STATE_FILE, recorded.get(STATE_FILE))
        _fsync_path(tmp)
        final = ckdir / name
        if final.exists():  # re-saving an epoch (e.g. after a resume): move the old one aside first
            trash = _make_temp_dir(ckdir, f".tmp-old-{name}-")
            os.rename(final, trash / name)
        os.rename(tmp, final)
        _fsync_path(ckdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prune(run_dir: str | os.PathLike, keep: int = 1) -> None:
    """Remove all but the newest `keep` checkpoints (and the one `best` names) and stale temp dirs."""
    ckdir = Path(run_dir) / CHECKPOINT_DIR
    protect = {_read_pointer(ckdir, LATEST), _read_pointer(ckdir, BEST)}
    dirs = epoch_dirs(run_dir)
    protect.update(p.name for p in dirs[-keep:])
    for p in ckdir.iterdir():
        if p.name.startswith(".tmp-") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif EPOCH_DIR_RE.match(p.name) and p.is_dir() and p.name not in protect:
            shutil.rmtree(p, ignore_errors=True)


# -- reading -----------------------------------------------------------------------------------------
def read_weights(ckpt_dir: str | os.PathLike, device: str | torch.device = "cpu",
                 file: str = MODEL_FILE) -> dict[str, torch.Tensor]:
    """The checkpoint's whole-model state (every expert, whatever world size wrote it); `file`:
    another model file of it (EMA_FILE)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / file
    try:
        return load_file(str(path), device=str(device))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is truncated or damaged: {first_line(e)}") from None


def load_for_resume(run_dir: str | os.PathLike, device: str | torch.device = "cpu",
                    log: Callable[[str], None] | None = None
                    ) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """(checkpoint dir, weights, training state) of the newest checkpoint that verifies and loads,
    trying `latest` first; one `log` line per checkpoint skipped, saying why. None when the run has
    no checkpoint; CheckpointError naming the file and its problem when none is usable."""
    problems: list[tuple[str, str]] = []
    for d in candidates(run_dir):
        try:
            verify_checkpoint(d, load_legacy_state=False)  # a state without manifest is checked by loading it
            weights = read_weights(d, device)
            state = load_state(d, device)
            missing = [k for k in RESUME_KEYS if k not in state]
            if missing:
                raise CheckpointError(f"{d / STATE_FILE} is not a training state (no {', '.join(missing)})")
        except CheckpointError as e:
            problems.append((d.name, str(e)))
            continue
        if log is not None:
            for name, problem in problems:
                log(f"resume: skipped checkpoint {name}: {problem}; resuming from {d.name}")
        return d, weights, state
    if problems:
        raise _no_usable(run_dir, [p for _, p in problems])
    return None


# The model files a checkpoint can hold, by the name the command line uses for them.
WEIGHTS = {"model": MODEL_FILE, "ema": EMA_FILE}


def _pointed_checkpoint(pointer: Path) -> Path:
    """The checkpoint folder a `latest` / `best` pointer file names."""
    target = _read_pointer(pointer.parent, pointer.name)
    if not target or not EPOCH_DIR_RE.match(target) or not (pointer.parent / target).is_dir():
        raise CheckpointError(f"{pointer} names no checkpoint folder of {pointer.parent} (it holds {target!r}); "
                              f"pass the run directory {pointer.parent.parent} to use its newest checkpoint that verifies")
    return pointer.parent / target


def resolve_model_file(path: str | os.PathLike, log: Callable[[str], None] | None = None, which: str = "latest",
                       weights: str = "model") -> Path:
    """A model .safetensors file itself, or a run directory, a checkpoint directory or a run's
    `checkpoints/latest` / `checkpoints/best` pointer file -> its model file: `weights` "model"
    (the trained weights) or "ema" (their EMA, runs with ema_decay), of the checkpoint `which`
    ("latest" or "best") names, else of the newest one whose file verifies (skipped ones go to
    `log`). A pointer file picks its checkpoint whatever `which` says."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: must be one of {', '.join(WEIGHTS)}")
    name, p = WEIGHTS[weights], Path(path)
    if p.is_file() and p.name in (LATEST, BEST) and p.parent.name == CHECKPOINT_DIR:
        p = _pointed_checkpoint(p)  # RUN/checkpoints/latest: a text file naming a checkpoint folder
    if p.is_file():
        if weights != "model":
            raise CheckpointError(f"{p} is a model file: the EMA weights are read from a run or checkpoint directory")
        return p
    if not p.is_dir():
        if os.path.exists(p):  # a FIFO, a device: never opened (reading one would block or never end)
            raise CheckpointError(f"{p} is {kind_of(os.stat(p).st_mode)}, not a model file or run directory")
        raise CheckpointError(f"{p} does not exist")
    if (p / MODEL_FILE).is_file():  # a checkpoint directory
        if not (p / name).is_file():
            raise CheckpointError(f"{p} holds no {name}: the run trained without ema_decay")
        verify_checkpoint(p, files=(name,))
        return p / name
    if weights != "model" and has_checkpoint(p) and not any((d / name).is_file() for d in candidates(p, which)):
        raise CheckpointError(f"{p} holds no {name} in its checkpoints: the run trained without ema_decay")
    ck = find_checkpoint(p, which=which, files=(name,), log=log)
    if ck is not None:
        return ck / name
    raise CheckpointError(f"{p} holds no checkpoint (looked for {MODEL_FILE} and {CHECKPOINT_DIR}/{which})")
