"""The training state as plain data: what `state.pt` may hold, and the loader that never runs code.

`torch.save` pickles, and an unrestricted unpickler runs whatever a planted file asks for.
A training state therefore holds only tensors, numbers, strings and lists/tuples/dicts of them
(numpy's and Python's RNG states are stored as int64 tensors and numbers), and it is loaded with
`weights_only=True`. States written before this (numpy's RNG key as an ndarray) still load: exactly
numpy's array reconstruction is allowed for them; a file that needs anything else is refused,
naming what it would import.
"""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...fileio import PathError
from ...readers import first_line, open_regular  # noqa: F401 - first_line: imported from here by checkpoint.py

STATE_FILE = "state.pt"


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected (missing, damaged, not loadable without running
    code, or no room to write one). The message names the file or directory."""


_PLAIN_TYPES = (str, bytes, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


def plain_state(obj: Any, where: str = "state") -> Any:
    """`obj` as data `torch.load(weights_only=True)` reads back: tensors, numbers, strings and
    lists/tuples/dicts of them (numpy arrays become tensors, numpy scalars numbers). Anything else
    is a TypeError naming the entry, raised when saving rather than found when resuming."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, _PLAIN_TYPES):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {plain_state(k, f"{where} key"): plain_state(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain_state(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(plain_state(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(f"training state entry {where} is a {type(obj).__module__}.{type(obj).__qualname__}: "
                    "checkpoints hold only tensors, numbers, strings and lists/tuples/dicts of them")


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and numbers (numpy's key and Python's state as int64 tensors)."""
    bit_generator, key, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"bit_generator": str(bit_generator), "key": torch.from_numpy(key.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() saved (also the tuples older checkpoints hold)."""
    torch.set_rng_state(state["torch"].cpu())
    py = state["python"]
    if isinstance(py, dict):
        random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    else:
        random.setstate(py)
    npy = state["numpy"]
    if isinstance(npy, dict):
        np.random.set_state((npy["bit_generator"], npy["key"].cpu().numpy().astype(np.uint32), npy["pos"],
                             npy["has_gauss"], npy["cached_gaussian"]))
    else:
        np.random.set_state(npy)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def load_state(ckpt_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's training state, loaded with weights_only=True: loading never runs code from
    the file. A file that does not load that way is a CheckpointError naming it."""
    path = Path(ckpt_dir) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"no training state at {path}")
    try:
        with open_regular(path, "training state") as f:  # never blocks on a FIFO planted as state.pt
            state = torch.load(f, map_location=map_location, weights_only=True)
    except PathError as e:  # not a regular file
        raise CheckpointError(str(e)) from None
    except pickle.UnpicklingError as e:
        state = _load_legacy_state(path, map_location, e)
    except Exception as e:  # noqa: BLE001 - a damaged zip or pickle fails in many ways
        raise CheckpointError(f"{path} is truncated or damaged: {first_line(e)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a training state (a {type(state).__name__}, not a dict)")
    return state


def _legacy_numpy_globals() -> list:
    """What numpy arrays in checkpoints written before the plain-data state need (numpy's RNG key):
    array and dtype reconstruction only, nothing that runs other code."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:
        from numpy.core import multiarray  # numpy 1.x

    return [multiarray._reconstruct, (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
            np.ndarray, np.dtype, type(np.dtype(np.uint32))]


_LEGACY_NAMES = {"numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray",
                 "numpy.dtype", "numpy.dtypes.UInt32DType"}


def _load_legacy_state(path: Path, map_location, error: Exception) -> Any:
    """A state saved before checkpoints held plain data only: numpy's RNG key is an array. Exactly
    that is allowed; anything else the file would need to load (code) is refused, naming it."""
    try:
        needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001
        needed = set()
    if needed and needed <= _LEGACY_NAMES:
        try:
            with torch.serialization.safe_globals(_legacy_numpy_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path} is truncated or damaged: {first_line(e)}") from None
    what = (f"it would import {', '.join(sorted(needed))}" if needed else first_line(error))
    raise CheckpointError(f"{path} does not load as plain data ({what}); vitmoe never runs code from a "
                          "checkpoint, so this file is refused") from None
