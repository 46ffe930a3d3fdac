"""A run's records: writing and reading metrics.jsonl, summary.json and config.yaml, and the
numbers derived from them (best accuracy, epochs to the threshold, the 60,000-image times), so the
trainer and `vitmoe.report` use the same threshold rule and the same times."""
from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Callable, Iterable

from .layout import METRICS_FILE, SUMMARY_FILE

IMAGES_60K = 60_000
"""The source project's tables report seconds per 60,000 images (its training-set size)."""
DEFAULT_THRESHOLD = 75.0
"""Test accuracy (percent) whose first epoch the tables report (t_epoch)."""
THRESHOLD_EPS = 1e-9
"""Accuracies are percentages computed from integer counts: allow for float round-off
(e.g. 74.99999999999999 for 75 %) when comparing with the threshold."""


class RunFormatError(ValueError):
    """A run directory is missing or one of its files cannot be parsed."""


# -- numbers ---------------------------------------------------------------------------------
def finite(x: Any) -> float | None:
    """A finite float, or None for missing / non-numeric / bool / NaN / inf."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def finite_int(x: Any) -> int | None:
    """An integral finite number as an int (3.0 -> 3), else None."""
    v = finite(x)
    return int(v) if v is not None and v == int(v) else None


def reached(acc: Any, threshold: float = DEFAULT_THRESHOLD) -> bool:
    """Whether a test accuracy (percent) counts as reaching `threshold`."""
    a = finite(acc)
    return a is not None and a >= threshold - THRESHOLD_EPS


def epochs_to_threshold(metrics: Iterable[dict[str, Any]], threshold: float = DEFAULT_THRESHOLD) -> int | None:
    """First (1-based) epoch at which ``test_acc`` >= ``threshold``; None if never."""
    for m in sorted(metrics, key=lambda r: r["epoch"]):
        if reached(m.get("test_acc"), threshold):
            return int(m["epoch"])
    return None


def time_for_60k(images_per_s: Iterable[Any]) -> float | None:
    """Seconds for 60,000 images at the median of the per-epoch throughputs (None without any)."""
    rates = [v for v in (finite(r) for r in images_per_s) if v is not None and v > 0]
    return IMAGES_60K / statistics.median(rates) if rates else None


def summarize(metrics: list[dict[str, Any]], threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """What the per-epoch rows say about a run: best/final accuracy, epochs to the threshold and
    the times. The trainer's summary.json holds these; the report recomputes them for a run that
    was killed before writing one."""
    rows = sorted(metrics, key=lambda r: r["epoch"])
    accs = [(int(r["epoch"]), a) for r in rows if (a := finite(r.get("test_acc"))) is not None]
    best = max(accs, key=lambda ea: (ea[1], -ea[0])) if accs else None  # the first epoch on ties
    times = [t for t in (finite(r.get("epoch_time_s")) for r in rows) if t is not None]
    evals = [t for t in (finite(r.get("eval_time_s")) for r in rows) if t is not None]
    return {
        "best_acc": best[1] if best else None,
        "best_epoch": best[0] if best else None,
        "final_acc": finite(rows[-1].get("test_acc")) if rows else None,
        "threshold": threshold,
        "epochs_to_threshold": epochs_to_threshold(rows, threshold),
        "train_time_s": sum(times),
        "time_per_epoch_s": sum(times) / len(times) if times else None,
        "train_time_60k_s": time_for_60k(r.get("images_per_s") for r in rows),
        "inference_time_60k_s": time_for_60k(r.get("eval_images_per_s") for r in rows),
        "epochs": len(rows),
        "wall_time_s": sum(times) + sum(evals),
    }


# -- writers ---------------------------------------------------------------------------------
def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    from ..fileio import atomic_write_text

    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def write_summary(run_dir: str | os.PathLike, summary: dict[str, Any]) -> Path:
    return write_json(Path(run_dir) / SUMMARY_FILE, summary)


def write_metrics(run_dir: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> Path:
    """Replace metrics.jsonl with `rows` (atomically: a resumed run rewrites what its checkpoint holds)."""
    from ..fileio import atomic_write_text

    return atomic_write_text(Path(run_dir) / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def append_metrics(run_dir: str | os.PathLike, row: dict[str, Any]) -> None:
    """Add one epoch's row to metrics.jsonl (a crash mid-write leaves at most a truncated last
    line, which `read_metrics` ignores)."""
    from ..fileio import open_append

    with open_append(Path(run_dir) / METRICS_FILE) as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


# -- readers ---------------------------------------------------------------------------------
def read_metrics(path: str | os.PathLike, warn: Callable[[str], None] = lambda msg: None) -> list[dict[str, Any]]:
    """Parse metrics.jsonl, one row per epoch in epoch order. A truncated last line is skipped and
    an epoch logged twice (a resumed run) keeps its later row, each with a `warn` message; any
    other bad line raises RunFormatError naming file and line."""
    from vitmoe.readers import read_text  # absolute: this package is also read on its own (tests)

    path = Path(path)
    try:
        lines = read_text(path, "metrics file").splitlines()
    except ValueError as e:  # PathError: not text, too large, not a regular file
        raise RunFormatError(str(e)) from None
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)  # only it may be truncated
    by_epoch: dict[int, dict[str, Any]] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        lineno = i + 1
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last:
                warn(f"{path}:{lineno}: ignoring truncated last line ({e.msg})")
                continue
            raise RunFormatError(f"{path}:{lineno}: malformed JSON line: {e.msg} (column {e.colno})") from None
        except RecursionError:
            raise RunFormatError(f"{path}:{lineno}: nested too deeply to be a metrics record") from None
        if not isinstance(rec, dict):
            raise RunFormatError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        for key in ("epoch", "test_acc"):
            if key not in rec:
                raise RunFormatError(f"{path}:{lineno}: missing required key {key!r}")
        epoch = finite_int(rec["epoch"])
        if epoch is None:
            raise RunFormatError(f"{path}:{lineno}: 'epoch' must be an integer, got {rec['epoch']!r}")
        acc = rec["test_acc"]
        if isinstance(acc, bool) or not isinstance(acc, (int, float)):  # NaN is allowed
            raise RunFormatError(f"{path}:{lineno}: 'test_acc' must be a number, got {rec['test_acc']!r}")
        rec["epoch"] = epoch
        if epoch in by_epoch:
            warn(f"{path}:{lineno}: epoch {epoch} logged again; keeping the later record")
        by_epoch[epoch] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]


def read_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Parse summary.json (a JSON object); RunFormatError names file and line when it is not."""
    from vitmoe.readers import read_text  # absolute: this package is also read on its own (tests)

    path = Path(path)
    try:
        data = json.loads(read_text(path, "summary"))  # bounded; a regular file (a FIFO never blocks)
    except json.JSONDecodeError as e:
        raise RunFormatError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    except RecursionError:
        raise RunFormatError(f"{path}: nested too deeply to be a summary") from None
    except ValueError as e:  # PathError: not text, too large, not a regular file
        raise RunFormatError(str(e)) from None
    if not isinstance(data, dict):
        raise RunFormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_config(path: str | os.PathLike, warn: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """config.yaml as a plain mapping ({} with a `warn` message when it cannot be read): the raw
    data for fallbacks; TrainConfig.from_yaml is what loads it as a config."""
    from vitmoe.readers import load_yaml  # absolute: this package is also read on its own (tests)

    path = Path(path)
    try:
        data = load_yaml(path)
    except Exception as e:  # noqa: BLE001 - a fallback source: never fatal
        warn(f"{path}: cannot read config ({' '.join(str(e).split())[:300]}); ignoring it")
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        warn(f"{path}: config is not a mapping; ignoring it")
        return {}
    return data


