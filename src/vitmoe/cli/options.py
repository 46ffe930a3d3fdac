"""Options of the commands, each defined once.

* Shared options: one helper per option that several commands take (`--device`, `--dataset` incl.
  `folder:PATH`, `--data-dir`, and the checkpoint selection `--checkpoint` / `--ema`), so every
  command spells, parses and checks it the same way.
* Flags made from a config dataclass: `add_field_flags` gives each field of TrainConfig a
  `--field-name` flag (type, default and one-line help from the field's annotation, default and
  docstring; choices where the config declares them), grouped by the field's section; a new field
  becomes a `vitmoe train` flag without any edit here. `field_overrides` reads back the ones given.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import textwrap
from typing import Any, Callable

# -- shared options --------------------------------------------------------------------------------


def dataset_arg(value: str) -> str:
    """--dataset: a built-in name or alias, or folder:PATH (argparse shows the message on a bad one)."""
    from ..data import DatasetError, canonical_name

    try:
        return canonical_name(value)
    except DatasetError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


MAX_SEED = 2**63 - 1
"""Seeds are int64 (torch.Generator.manual_seed, TrainConfig.seed)."""


def seed_arg(value: str) -> int:
    """--seed: an integer in [0, 2**63 - 1] (1e23 or 2**70 would fail in torch after the work)."""
    try:
        seed = int(value.strip())
    except ValueError:
        seed = None
    if seed is None or not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"invalid seed {value[:40]!r}: an integer in [0, {MAX_SEED}]")
    return seed


def dataset_metavar() -> str:
    from ..data import dataset_choices

    return "{" + dataset_choices(",") + "}"


def add_dataset_option(p, help: str, default: str | None = None) -> None:
    """--dataset NAME|folder:PATH, parsed by the dataset registry (`vitmoe.data.canonical_name`)."""
    p.add_argument("--dataset", type=dataset_arg, default=default, metavar=dataset_metavar(), help=help)


def add_device_option(p, default: str | None = "auto", help: str | None = None) -> None:
    """--device auto|cpu|cuda (TrainConfig's DEVICES)."""
    from ..training.config.train_config import DEVICES

    p.add_argument("--device", choices=list(DEVICES), default=default,
                   help=help or f"device (default {default or 'auto'}: CUDA when available)")


def add_data_dir_option(p, help: str = "where datasets are found/downloaded (default $DATA, then ./data)") -> None:
    p.add_argument("--data-dir", default=None, help=help)


def add_checkpoint_options(p, default: str = "latest") -> None:
    """--checkpoint and --ema: which model file of a run directory a command reads."""
    from ..rundir import POINTERS

    p.add_argument("--checkpoint", dest="which", choices=list(POINTERS), default=default,
                   help=f"which checkpoint of a run directory (default {default})")
    p.add_argument("--ema", action="store_true",
                   help="the checkpoint's EMA of the weights (ema.safetensors, runs trained with --ema-decay) "
                        "instead of the trained weights")


SHARED_OPTIONS: dict[str, Callable[..., None]] = {
    "dataset": lambda g, help: add_dataset_option(g, help),
    "device": lambda g, help: add_device_option(g, default=None, help=help),
}
"""Config fields whose flag is a shared option (the same parsing as in every other command)."""


# -- flags made from a config dataclass ----------------------------------------------------------------
def field_docs(cls) -> dict[str, tuple[str, str]]:
    """{field: (section, docstring)} from the source of `cls` and its dataclass bases: the string
    under each field, and the `# --- section ---` comment above it."""
    docs: dict[str, tuple[str, str]] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls) -> dict[str, tuple[str, str]]:
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    sections, section = {}, ""
    for i, line in enumerate(lines, 1):
        m = re.match(r"\s*# --- (.+?) ---", line)
        if m:
            section = m.group(1)
        sections[i] = section
    docs: dict[str, tuple[str, str]] = {}
    body = ast.parse(source).body[0].body
    for node, after in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = ""
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                doc = " ".join(after.value.value.split())
            docs[node.target.id] = (sections.get(node.lineno, ""), doc)
    return docs


def first_sentence(doc: str) -> str:
    """The docstring up to its first full stop outside brackets."""
    depth = 0
    for i, ch in enumerate(doc):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "." and depth <= 0 and (i + 1 == len(doc) or doc[i + 1] == " ") and not doc[:i].endswith(("e.g", "i.e")):
            doc = doc[:i]
            break
    return doc


def _flag_type(annotation: str) -> tuple[Any, str | None]:
    """(argparse type, 'bool' or 'yaml' or None) of a field annotation such as 'int | None'."""
    base = [t.strip() for t in annotation.split("|") if t.strip() != "None"]
    kind = base[0] if len(base) == 1 else "yaml"
    if kind == "bool":
        return None, "bool"
    if kind in ("int", "float", "str"):
        return {"int": int, "float": float, "str": str}[kind], None
    return _yaml_value, "yaml"


def _yaml_value(text: str) -> Any:
    from ..readers import yaml_value

    try:
        return yaml_value(text, "a flag's value")
    except ValueError as e:  # PathError: aliases past the bound
        raise argparse.ArgumentTypeError(str(e)) from None


def _default_text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_field_flags(parser: argparse.ArgumentParser, cls, skip: set[str], choices: dict[str, Any],
                    aliases: dict[str, list[str]], metavars: dict[str, str] | None = None) -> list[str]:
    """A flag per field of dataclass `cls` (except `skip`): `--field-name` plus `aliases[field]`,
    dest the field name, default None (so only flags given override a config file), help the first
    sentence of its docstring and its default; bools take --name / --no-name. Returns the fields."""
    docs, groups, added = field_docs(cls), {}, []
    defaults = cls()
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name not in docs:
            continue
        section, doc = docs[f.name]
        group = groups.get(section) or groups.setdefault(section, parser.add_argument_group(section or "settings"))
        default = _default_text(getattr(defaults, f.name))
        sentence = first_sentence(doc) or f.name.replace("_", " ")
        help = sentence if "None:" in sentence else f"{sentence} (default {default})"
        flags = [f"--{f.name.replace('_', '-')}", *aliases.get(f.name, [])]
        if f.name in SHARED_OPTIONS:
            SHARED_OPTIONS[f.name](group, help)
            added.append(f.name)
            continue
        kind, how = _flag_type(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type)))
        kw: dict[str, Any] = dict(dest=f.name, default=None, help=help)
        if how == "bool" and f.name.startswith("no_"):
            # A field already named as a negation: --no-decay-1d / --decay-1d, not --no-no-decay-1d.
            positive = f"--{f.name[3:].replace('_', '-')}"
            group.add_argument(*flags, action="store_const", const=True, **(kw | {"help": f"{help}; {positive}: off"}))
            group.add_argument(positive, action="store_const", const=False, dest=f.name, help=argparse.SUPPRESS)
        elif how == "bool":
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        else:
            metavar = (metavars or {}).get(f.name) or ("YAML" if how == "yaml" else None)
            if f.name in choices:
                kw["choices"] = list(choices[f.name])
            group.add_argument(*flags, type=kind, metavar=metavar, **kw)
        added.append(f.name)
    return added


def field_overrides(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """The fields whose flags were given (None: not given)."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
