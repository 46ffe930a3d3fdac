"""Which expert computation `dispatch: auto` uses on this machine: the table `vitmoe bench` measures.

The experts can run as one grouped matmul (`torch._grouped_mm`) or as a batched matmul over
capacity-padded queues (`bmm`); which is faster depends on the device, the dtype and the shape,
and differs between machines (and between runs of one shared machine: BENCHMARKS.md s.0).
`vitmoe bench` times both on a run's own layer shapes and writes the winner here; without an
entry, `auto` takes the grouped path wherever it runs. A row says:

    "cpu/bfloat16/D300/H1024/E16/R256": "padded"    # device/dtype/width/hidden/experts/rows per expert

R is the rows each expert receives per forward on average (token copies over experts), rounded
up to a power of two, so one measurement covers the batch sizes near it.

The table is JSON at `$VITMOE_CACHE/dispatch.json` (default `$XDG_CACHE_HOME/vitmoe`, else
`~/.cache/vitmoe`), read once per process; a file that is not such a table is ignored with one
warning (it never stops a run, and nothing in it is executed).
"""
from __future__ import annotations

import json
import os
import warnings
from functools import lru_cache
from pathlib import Path

import torch

TABLE_FILE = "dispatch.json"
CHOICES = ("grouped", "padded")
MAX_TABLE_BYTES = 1 << 20


def table_path() -> Path:
    root = os.environ.get("VITMOE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "vitmoe")
    return Path(root) / TABLE_FILE


def shape_key(device_type: str, dtype: torch.dtype, width: int, hidden: int, experts: int, rows: int) -> str:
    """The table's key of an expert computation; `rows`: rows per expert (rounded up to a power of 2)."""
    bucket = 1 << max(0, int(rows) - 1).bit_length()
    return f"{device_type}/{str(dtype).removeprefix('torch.')}/D{width}/H{hidden}/E{experts}/R{bucket}"


@lru_cache(maxsize=None)
def _table(path: str) -> dict[str, str]:
    p = Path(path)
    try:
        if not p.is_file():
            return {}
        if p.stat().st_size > MAX_TABLE_BYTES:
            raise ValueError(f"larger than {MAX_TABLE_BYTES} bytes")
        data = json.loads(p.read_text())
        if not isinstance(data, dict) or not all(isinstance(k, str) and v in CHOICES for k, v in data.items()):
            raise ValueError(f"not an object of shape keys to {' or '.join(CHOICES)}")
        return dict(data)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        warnings.warn(f"{p}: ignoring the measured dispatch table ({e}); `vitmoe bench` writes a new one",
                      stacklevel=3)
        return {}


def measured_choice(key: str) -> str | None:
    """The path `vitmoe bench` measured fastest for `key` (`shape_key`), or None."""
    return _table(str(table_path())).get(key)


def record(choices: dict[str, str]) -> Path:
    """Merge `choices` into this machine's table (atomically) and forget the cached read."""
    from ..fileio import atomic_write_text

    path = table_path()
    table = {**_table(str(path)), **choices}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(dict(sorted(table.items())), indent=1) + "\n")
    _table.cache_clear()
    return path
