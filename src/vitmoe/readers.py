"""Bounded readers: every file whose path comes from a user or from another file is read here.

* **Regular files only** (`open_regular`): opened without blocking (a FIFO named `x.png` or
  `config.yaml` would otherwise hang the reader until someone writes to it), then refused unless
  the opened file is a regular file: folders, FIFOs, devices and sockets are one `PathError`.
  Symbolic links are followed (a recipe may be a link); what they point to must be a regular file.
* **Sizes are checked before parsing**: a config is at most MAX_CONFIG_BYTES (a 35 MB YAML file
  is refused before PyYAML spends minutes and gigabytes on it), a JSON record at most
  MAX_JSON_BYTES, a safetensors header at most MAX_HEADER_BYTES (the limit safetensors itself sets).
* **YAML anchors and aliases are bounded** (`parse_yaml`): the document's node graph is composed
  (aliases are shared nodes, so composing is linear in the text), then its size with every alias
  expanded is counted before anything is built; over MAX_YAML_NODES is refused. A 500-byte
  "billion laughs" config is one line, at once, instead of a hang in whatever walks it later.
* **One line per error**, naming the file and where in it (line and column), whatever the parser
  wrote (PyYAML's errors span four lines); nesting deep enough to exhaust Python's recursion is
  an error too, not a RecursionError traceback.

Nothing here runs code from a file: YAML is read with the safe loader, JSON is JSON.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import re
import stat
import struct
from pathlib import Path
from typing import Any, BinaryIO

from .fileio import PathError, format_bytes, kind_of

MAX_CONFIG_BYTES = 1_000_000
"""A YAML config: the largest recipe is about 2 kB; a run's config.yaml about 3 kB."""
MAX_JSON_BYTES = 256_000_000
"""A JSON record (summary, manifest, metrics, transformers config, cache manifest)."""
MAX_HEADER_BYTES = 100_000_000
"""A safetensors header (safetensors refuses larger ones too)."""
MAX_YAML_NODES = 100_000
"""Values in a YAML document with every alias expanded (a config has a few hundred)."""


def open_regular(path: str | os.PathLike, what: str = "file") -> BinaryIO:
    """`path` opened for binary reading if it is (or links to) a regular file; never blocks. A missing
    file is FileNotFoundError (callers say what was expected there); anything else is PathError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise PathError(f"{what} {path} cannot be read: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise PathError(f"{what} {path} is {kind_of(mode)}: vitmoe reads regular files only")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular(path: str | os.PathLike, what: str = "file") -> Path:
    """Raise unless `path` is (or links to) a regular file, as `open_regular` would."""
    with open_regular(path, what):
        return Path(path)


def read_bytes(path: str | os.PathLike, what: str = "file", limit: int = MAX_JSON_BYTES) -> bytes:
    """The whole regular file, if it is at most `limit` bytes (checked before reading)."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        raise PathError(f"{what} {path} is {format_bytes(max(size, len(data)))}: more than the "
                        f"{format_bytes(limit)} vitmoe reads as a {what}")
    return data


def decode_text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise PathError(f"{where} is not text (not UTF-8)") from None


def read_text(path: str | os.PathLike, what: str = "file", limit: int = MAX_JSON_BYTES) -> str:
    return decode_text(read_bytes(path, what, limit), f"{what} {path}")


def first_line(e: BaseException) -> str:
    """The informative line of a loader's error (torch's weights_only errors start with six lines of
    advice, one of them to load with weights_only=False, which vitmoe never does)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line
    return lines[0] if lines else type(e).__name__


# -- YAML ----------------------------------------------------------------------------------------------
try:
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # PyYAML without libyaml
    from yaml import SafeLoader as _SafeLoader


class _Loader(_SafeLoader):
    """safe_load with YAML 1.2's booleans: only true, True, TRUE, false, False, FALSE. YAML 1.1 also reads yes, no,
    on and off as booleans, so `amp: off` or `--set amp=off` gave amp=False, which no choice field
    takes; the boolean fields read those words themselves (validation.Fields.boolean)."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in _SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _yaml_error(e: Exception, where: str) -> PathError:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or " ".join(str(e).split())
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(e, "context", None)
    return PathError(f"{where} is not valid YAML: {problem}{at}" + (f" ({context})" if context else ""))


def expanded_size(node, where: str, limit: int = MAX_YAML_NODES) -> int:
    """Values in the composed YAML node graph with every alias expanded (capped at limit + 1), counted
    without expanding anything: each shared node is sized once. A node that contains itself (a
    recursive anchor) is refused."""
    import yaml

    sizes: dict[int, int] = {}
    stack: list[tuple[Any, bool]] = [(node, False)]
    on_path: set[int] = set()
    while stack:
        n, done = stack.pop()
        if done:
            on_path.discard(id(n))
            children = _children(n, yaml)
            sizes[id(n)] = min(1 + sum(sizes[id(c)] for c in children), limit + 1)
            continue
        if id(n) in sizes:
            continue
        if id(n) in on_path:
            raise PathError(f"{where}: an anchor refers to itself (a recursive YAML structure)")
        on_path.add(id(n))
        stack.append((n, True))
        for c in _children(n, yaml):
            if id(c) in on_path:
                raise PathError(f"{where}: an anchor refers to itself (a recursive YAML structure)")
            if id(c) not in sizes:
                stack.append((c, False))
    return sizes[id(node)]


def _children(n, yaml) -> list:
    if isinstance(n, yaml.SequenceNode):
        return list(n.value)
    if isinstance(n, yaml.MappingNode):
        return [x for pair in n.value for x in pair]
    return []


def parse_yaml(text: str, where: str, limit: int = MAX_YAML_NODES) -> Any:
    """`yaml.safe_load(text)`, bounded (module docstring); errors are PathError naming `where`."""
    import yaml

    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if expanded_size(node, where, limit) > limit:
            raise PathError(f"{where} expands to more than {limit:,} values through YAML anchors and aliases "
                            "(a config holds a few hundred): refused")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise _yaml_error(e, where) from None
    except RecursionError:
        raise PathError(f"{where} is nested too deeply to be a config") from None
    finally:
        loader.dispose()


def yaml_value(text: str, where: str) -> Any:
    """A command-line value (`--set KEY=VALUE`) as YAML reads it, or the text itself when it is not
    YAML (`--set name=a:b`); bounded as `parse_yaml` (aliases beyond the bound are refused)."""
    if len(text) > MAX_CONFIG_BYTES:
        raise PathError(f"{where}: a value of {len(text):,} characters; at most {MAX_CONFIG_BYTES:,}")
    try:
        return parse_yaml(text, where)
    except PathError as e:
        if "is not valid YAML" in str(e):
            return text
        raise


def load_yaml(path: str | os.PathLike, what: str = "config file", limit: int = MAX_CONFIG_BYTES) -> Any:
    """A YAML file read by `parse_yaml`, at most `limit` bytes."""
    where = f"{what} {path}"
    return parse_yaml(decode_text(read_bytes(path, what, limit), where), where)


# -- JSON ----------------------------------------------------------------------------------------------
def parse_json(data: str | bytes, where: str) -> Any:
    """`json.loads`, with every failure (syntax, not text, nesting past the recursion limit) one
    PathError naming `where`, line and column. NaN and Infinity are read as JSON readers do; the
    callers check the values they use."""
    if isinstance(data, bytes):
        data = decode_text(data, where)
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise PathError(f"{where} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except RecursionError:
        raise PathError(f"{where} is nested too deeply") from None


def load_json(path: str | os.PathLike, what: str = "file", limit: int = MAX_JSON_BYTES) -> Any:
    return parse_json(read_bytes(path, what, limit), f"{what} {path}")


# -- safetensors ---------------------------------------------------------------------------------------
def safetensors_header(path: str | os.PathLike, what: str = "model file", limit: int = MAX_HEADER_BYTES,
                       within_file: bool = True) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensor entries {name: {dtype, shape, data_offsets}}, metadata {str: str}, file size) of a
    safetensors file, read from its header alone: the announced header length is checked against
    `limit` and the file size before it is read, every entry's shape and offsets are checked to be
    non-negative integers (and, with `within_file`, to end within the file; a caller that reports
    truncation itself passes False). PathError names the file and what is wrong."""
    where = f"{what} {path}"
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise PathError(f"{where} is not a safetensors file ({size} bytes)")
        n = struct.unpack("<Q", head)[0]
        if n > limit:
            raise PathError(f"{where} announces a {format_bytes(n)} header: more than the {format_bytes(limit)} "
                            "a safetensors header may hold (not a safetensors file, or damaged)")
        if n > size - 8:
            raise PathError(f"{where} is truncated ({size:,} bytes): not a whole safetensors file")
        header = parse_json(f.read(n), f"{where} (its safetensors header)")
    if not isinstance(header, dict):
        raise PathError(f"{where}: its safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise PathError(f"{where}: its safetensors metadata is not a mapping of strings")
    data_size = size - 8 - n
    for name, entry in header.items():
        ok = (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
              and isinstance(entry.get("shape"), list) and _ints(entry["shape"])
              and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
              and _ints(entry["data_offsets"]) and entry["data_offsets"][0] <= entry["data_offsets"][1]
              and (entry["data_offsets"][1] <= data_size or not within_file))
        if not ok:
            raise PathError(f"{where}: its safetensors header entry {name[:80]!r} is not a tensor within the file "
                            "(dtype, shape, data_offsets)")
    return header, meta, size


def _ints(values: list) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)


def tensor_elements(header: dict[str, dict]) -> int:
    """Elements of every tensor a safetensors header announces."""
    return sum(math.prod(entry["shape"]) for entry in header.values())


__all__ = ["MAX_CONFIG_BYTES", "MAX_JSON_BYTES", "MAX_HEADER_BYTES", "MAX_YAML_NODES", "open_regular",
           "check_regular", "read_bytes", "read_text", "decode_text", "parse_yaml", "yaml_value", "load_yaml", "parse_json",
           "load_json", "safetensors_header", "first_line", "tensor_elements", "expanded_size"]
