"""Conversions write their output next to its destination and move it there only once it is complete and, with
``--verify``, has passed the parity check: an interrupted or failed conversion leaves no loadable wrong model
behind (issue 15)."""

from __future__ import annotations

import os
import shutil
import tempfile

from .layout import ConversionError


def _default_dir_mode() -> int:
    """The mode ``mkdir`` would give a new directory: ``mkdtemp`` makes it 0700, which the rename would keep."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def check_new_directory(path: str, flag: str) -> None:
    """Refuse a destination that already holds something: a conversion never deletes or mixes with existing files."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise ConversionError(f"{flag} {path} exists and is not a directory; import into a new directory")
    entries = sorted(os.listdir(path))
    if entries:
        shown = ", ".join(entries[:3]) + (f", ... ({len(entries)} entries)" if len(entries) > 3 else "")
        raise ConversionError(f"{flag} {path} is not empty (holds {shown}); import into a new directory")


def staging_dir(dest: str) -> str:
    """A new, uniquely named directory next to ``dest`` (same filesystem, so :func:`publish` is a rename)."""
    dest = os.path.abspath(dest)
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.", suffix=".tmp", dir=parent)
    os.chmod(tmp, _default_dir_mode())
    return tmp


def publish(tmp: str, dest: str, merge: bool = False) -> None:
    """Move the finished ``tmp`` to ``dest``.

    A missing or empty ``dest`` is replaced by one rename, so readers see all of
    the output or none of it. With ``merge``, a non-empty ``dest`` (export-hf
    into an existing directory, as before) gets ``tmp``'s entries one
    ``os.replace`` each, and keeps its other files.
    """
    if os.path.isdir(dest) and not os.listdir(dest):
        os.rmdir(dest)
    if not os.path.lexists(dest):
        os.rename(tmp, dest)
        return
    if not merge or not os.path.isdir(dest):
        raise ConversionError(f"{dest} appeared while converting and is not empty; nothing was written: convert "
                              "again into a new directory")
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(dest, name))
    os.rmdir(tmp)


def discard(tmp: str) -> None:
    """Remove a staged output that is not to be published (failed parity, an error, an interrupt)."""
    shutil.rmtree(tmp, ignore_errors=True)
