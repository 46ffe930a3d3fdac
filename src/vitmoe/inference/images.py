"""The image files an IMAGES argument names: files, folders (searched recursively) and glob patterns."""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterable

from ..data.folder import IMAGE_EXTS, list_images


class ImageInputError(ValueError):
    """An IMAGES argument names nothing usable, or an image cannot be read; the message names it."""


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS


def find_images(patterns: Iterable[str | os.PathLike]) -> list[Path]:
    """Every image file the arguments name, in order, each once.

    * a file: taken as it is, whatever its extension (Pillow decides whether it is an image);
    * a folder: its files with an image extension ({exts}), recursively, sorted, hidden ones skipped
      (so a folder dataset's `.vitmoe-cache` is never read as images);
    * otherwise a glob pattern (`*`, `?`, `[...]`, `**` for any depth): the image files and the
      folders it matches, sorted.

    ImageInputError naming the argument when it matches nothing or a folder holds no images."""
    found: list[Path] = []
    for pattern in patterns:
        p = Path(pattern).expanduser()
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            images = list_images(p)
            if not images:
                raise ImageInputError(f"IMAGES {pattern}: the folder holds no images ({', '.join(IMAGE_EXTS)})")
            found.extend(images)
        elif glob.has_magic(str(pattern)):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(str(pattern)), recursive=True))
            images = [m for m in matches if m.is_file() and _is_image(m)]
            for m in matches:
                if m.is_dir():
                    images.extend(list_images(m))
            if not images:
                raise ImageInputError(f"IMAGES {pattern}: the pattern matches no image files ({', '.join(IMAGE_EXTS)})")
            found.extend(images)
        else:
            raise ImageInputError(f"IMAGES {pattern}: no such file or folder (give image files, folders or glob "
                                  "patterns such as 'photos/*.jpg')")
    seen: set[str] = set()
    unique = []
    for p in found:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


find_images.__doc__ = find_images.__doc__.format(exts=", ".join(IMAGE_EXTS))
