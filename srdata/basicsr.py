"""Read a BasicSR / Real-ESRGAN LMDB (``X.lmdb/``) as an HR training source.

Layout, as BasicSR's ``make_lmdb_from_imgs`` / ``LmdbMaker`` write it::

    X.lmdb/data.mdb, lock.mdb   one LMDB environment (subdir=True)
    X.lmdb/meta_info.txt        one line per image: ``{key}.png ({h},{w},{c}) {level}``

The LMDB key is ``key`` (ASCII, no extension; may hold slashes, e.g. REDS ``000/00000000``),
the value ``cv2.imencode('.png', img)`` of the image as ``cv2.IMREAD_UNCHANGED`` read it
(BGR, gray, BGRA or 16-bit). BasicSR itself recovers the key with ``line.split('.')[0]``,
which truncates names holding a dot; we strip only the ``.png`` that the writer appends.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from . import format as fmt
from .reader import PackedDB, open_db, open_shard  # noqa: F401  open_db: moved to reader

META = "meta_info.txt"
# The name is everything before the shape, so names with spaces or dots parse too.
_LINE = re.compile(r"(?P<name>\S.*?)\s+\((?P<h>\d+),\s*(?P<w>\d+),\s*(?P<c>\d+)\)\s+\d+")


def _parse_meta(path: Path) -> list[fmt.Record]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise fmt.DBError(f"cannot read {path}: {e}") from e
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        m = _LINE.fullmatch(line.strip())
        if m is None:
            raise fmt.DBError(f"line {lineno} of {path}: expected `name (h,w,c) level`, "
                              f"got {line!r}")
        name = m["name"]
        key = name[:-4] if name.endswith(".png") else name
        h, w = int(m["h"]), int(m["w"])
        if h == 0 or w == 0:
            raise fmt.DBError(f"line {lineno} of {path}: image {name!r} has shape {h}x{w}")
        # channels=3: decode always yields RGB, whatever c (1, 3 or 4) was stored
        records.append(fmt.Record(len(records), 0, key, h, w, fmt.CHANNELS, 0, 0, name))
    if not records:
        raise fmt.DBError(f"{path} lists no images; the BasicSR LMDB is empty or unfinished")
    return records


class BasicSRDB:
    """A BasicSR LMDB with PackedDB's reading interface: ``len``, ``read(i)``, ``image(i)``.

    BasicSR stores no sizes or checksums, so ``nbytes`` and ``crc32`` are 0 in every record.
    """

    codec = "png"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise fmt.DBError(f"BasicSR LMDB {self.path} does not exist or is not a directory")
        meta = self.path / META
        if not meta.is_file():
            raise fmt.DBError(f"{self.path} is not a BasicSR LMDB: {meta} is missing")
        if not (self.path / "data.mdb").is_file():
            raise fmt.DBError(f"{self.path} is not a complete BasicSR LMDB: "
                              f"{self.path / 'data.mdb'} is missing")
        self.records = _parse_meta(meta)
        self.heights = np.array([r.height for r in self.records], np.int64)
        self.widths = np.array([r.width for r in self.records], np.int64)
        self.manifest = {"format": "basicsr-lmdb", "count": len(self.records),
                         "codec": self.codec, "source_root": str(self.path),
                         "skipped": [], "shards": []}

    def __len__(self) -> int:
        return len(self.records)

    def read(self, i: int) -> bytes:
        """The PNG bytes of image ``i``; DBError names the key if it is missing."""
        rec = self.records[i]
        # BasicSR's lmdb dir is itself the environment, so it shares PackedDB's handle table
        with open_shard(self.path).begin(buffers=False) as txn:
            value = txn.get(rec.key.encode())
        if value is None:
            raise fmt.DBError(f"{self.path}: key {rec.key!r} (image {i}, line {rec.path!r} "
                              f"of {META}) is missing from data.mdb")
        return value

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` as HxWx3 uint8 RGB (gray expanded; alpha dropped, not composited)."""
        rec, value = self.records[i], self.read(i)  # read's own error already names the key
        try:
            return fmt.decode_image(value, self.codec, rec.shape)
        except fmt.DBError as e:
            raise fmt.DBError(f"{self.path}: key {rec.key!r} (from {rec.path}): {e}") from None
