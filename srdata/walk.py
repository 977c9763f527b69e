"""Listing the files under IMAGES: symlinked folders followed, each real file once.

The real tree is walked first, then the symlinked folders it holds (and those they hold),
so a file keeps the path that does not go through a link. A folder or file reached a second
time (a symlink loop, a link into the tree, a hard link) is listed as skipped with the path
it was packed under: nothing is dropped silently and nothing is packed twice.
"""
from __future__ import annotations

import os
import re
from pathlib import Path


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def display(rel: bytes) -> str:
    """A source path for humans and JSON: non-UTF-8 bytes shown as \\xNN escapes."""
    return rel.decode("utf-8", "backslashreplace")


def _show(rel: bytes) -> str:
    return display(rel) or "."  # the root folder itself


def walk(root: Path, skip_dir: Path | None = None, skip_names: re.Pattern | None = None
         ) -> tuple[list[bytes], list[dict]]:
    """(every file under ``root`` as sorted relative byte paths, skipped [{path, reason}]).

    ``skip_dir`` is left out (the database, when it lies inside ``root``), and so are the
    entries matching ``skip_names`` in ``skip_dir``'s parent folder (the pack's own lock
    and temporary folders). Raises OSError if ``root`` itself cannot be listed.
    """
    root_b = os.fsencode(root)

    def stat_or_none(path):
        try:
            return os.stat(path)
        except OSError:
            return None

    skip = stat_or_none(skip_dir) if skip_dir is not None else None
    skip_parent = stat_or_none(skip_dir.parent) if skip_dir is not None else None
    seen_dirs: dict[tuple[int, int], bytes] = {}
    files: list[tuple[bool, bytes, tuple | None]] = []  # (through a link, rel, identity)
    skipped: list[dict] = []
    todo: list[tuple[bytes, bool]] = [(b"", False)]  # (folder, reached through a link)
    links: list[bytes] = []

    while todo or links:
        rel_dir, through_link = todo.pop() if todo else (links.pop(0), True)
        path = os.path.join(root_b, rel_dir) if rel_dir else root_b
        try:
            st = os.stat(path)
            ident = _identity(st)
            # a folder reached again (a link back, an alias) is skipped below: not listed
            entries = [] if ident in seen_dirs else sorted(os.scandir(path),
                                                           key=lambda e: e.name)
        except OSError as e:
            if not rel_dir:
                raise
            skipped.append({"path": _show(rel_dir), "reason": f"unreadable folder: "
                                                              f"{e.strerror}"})
            continue
        if ident in seen_dirs:
            skipped.append({"path": _show(rel_dir), "reason": "symlink to a folder packed "
                            f"already, as {_show(seen_dirs[ident])!r}"})
            continue
        seen_dirs[ident] = rel_dir
        in_skip_parent = skip_parent is not None and os.path.samestat(st, skip_parent)
        subdirs = []
        for entry in entries:
            name = os.fsencode(entry.name)
            rel = os.path.join(rel_dir, name) if rel_dir else name
            if in_skip_parent and skip_names is not None and skip_names.match(name):
                continue
            try:
                is_dir = entry.is_dir()
                if is_dir and skip is not None and os.path.samestat(entry.stat(), skip):
                    continue
            except OSError:
                is_dir = False
            if is_dir:
                is_link = entry.is_symlink()
                (links if is_link else subdirs).append(rel)
                continue
            try:
                ident = _identity(entry.stat())
            except OSError:
                ident = None  # a broken link: the pack lists it with its reason
            files.append((through_link or entry.is_symlink(), rel, ident))
        todo.extend((d, through_link) for d in reversed(subdirs))
    return _once_each(files, skipped)


def _once_each(files, skipped):
    # Files not reached through a link claim their identity first, so they keep their path.
    first: dict[tuple[int, int], bytes] = {}
    kept = []
    for _, rel, ident in sorted(files, key=lambda f: (f[0], f[1])):
        if ident is not None and ident in first:
            skipped.append({"path": _show(rel), "reason": "the same file as "
                            f"{_show(first[ident])!r} (a symlink or hard link), packed once"})
            continue
        if ident is not None:
            first[ident] = rel
        kept.append(rel)
    return sorted(kept), sorted(skipped, key=lambda s: s["path"])
