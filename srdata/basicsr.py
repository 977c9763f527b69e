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

import hashlib
import operator
import os
import re
import zlib
from pathlib import Path

import lmdb
import numpy as np

from . import format as fmt
from .shards import forget_replaced, open_shard

META = "meta_info.txt"
# Records whose whole value the identity digests, evenly spread (first and last included):
# with the LMDB's own counts, what tells a rewrite from the same LMDB (BasicSRDB.identity).
SAMPLE = 64
# One line, `name (h,w,c) level`, matched line by line over a whole file: (name, h, w). The
# name is everything before the shape, so names with spaces or dots parse too.
_ALL = re.compile(r"^[ \t]*(\S.*?)[ \t]+\((\d+),[ \t]*(\d+),[ \t]*\d+\)[ \t]+\d+[ \t\r]*$",
                  re.M)


_PRINTABLE = bytes(range(0x20, 0x7F))


def _parse_exact(text: str) -> tuple[list, np.ndarray] | None:
    """(names, heights and widths) of a meta_info.txt written exactly as BasicSR writes it,
    ``{name} ({h},{w},{c}) {level}\\n`` with printable ASCII names, by splits and byte
    counts at C speed (a regex match per line costs ~0.5 s a million lines); None if any
    line differs in the least, for the general pattern to read it."""
    parts = text.replace(" (", "\n").replace(") ", "\n").split("\n")
    n = len(parts) // 3
    if len(parts) % 3 != 1 or parts[-1] or not n:  # " (" or ") " in a name shifts parts
        return None
    names, shapes, levels = parts[0:-1:3], parts[1::3], parts[2::3]
    level = "".join(levels)
    shape = ";".join(shapes).encode("utf-8")
    name = ("\n" + "\n".join(names) + "\n").encode("utf-8")
    exact = (all(levels) and level.isascii() and level.isdigit()
             # shapes: three decimal numbers, none empty
             and shape.translate(None, b"0123456789") == b",,;" * (n - 1) + b",,"
             and not any(s in shape for s in (b",,", b",;", b";,", b";;"))
             and shape[:1].isdigit() and shape[-1:].isdigit()
             # names: printable ASCII, none empty or starting or ending with a space
             and name.translate(None, _PRINTABLE) == b"\n" * (n + 1)
             and not any(s in name for s in (b"\n\n", b"\n ", b" \n")))
    if not exact:
        return None
    return names, np.fromstring(shape.replace(b";", b","), np.int64, sep=",").reshape(-1, 3)


def _parse_meta(path: Path) -> tuple[tuple, tuple, np.ndarray, np.ndarray]:
    """(names, keys, heights, widths) of meta_info.txt's lines, in order."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise fmt.DBError(f"cannot read {path}: {e}") from e
    exact = _parse_exact(text)
    if exact is not None:
        names, hwc = exact
        return _named(path, names, hwc[:, 0], hwc[:, 1])
    # one regex pass over the whole text (fast for a million lines); line by line only to
    # name the line that does not parse
    # (the same pattern names the bad line, so no line can be skipped without an error)
    found = _ALL.findall(text)
    lines = text.split("\n")
    if len(found) != sum(1 for line in lines if line.strip()):
        lineno = next(n for n, line in enumerate(lines, 1)
                      if line.strip() and _ALL.fullmatch(line) is None)
        raise fmt.DBError(f"line {lineno} of {path}: expected `name (h,w,c) level`, "
                          f"got {lines[lineno - 1]!r}")
    if not found:
        raise fmt.DBError(f"{path} lists no images; the BasicSR LMDB is empty or unfinished")
    names, hs, ws = zip(*found)
    return _named(path, names, np.array(hs, np.int64), np.array(ws, np.int64))


def _named(path: Path, names, heights: np.ndarray, widths: np.ndarray):
    # keys: the names less the ".png" the writer appends, stripped in one pass over them all
    keys = ("\n".join(names) + "\n").replace(".png\n", "\n").split("\n")[:-1]
    zero = np.flatnonzero((heights == 0) | (widths == 0))
    if zero.size:
        i = int(zero[0])
        raise fmt.DBError(f"line {i + 1} of {path}: image {names[i]!r} has shape "
                          f"{heights[i]}x{widths[i]}")
    return names, keys, heights, widths


_CRC_TABLE = np.array([zlib.crc32(bytes([b])) ^ zlib.crc32(b"\0") for b in range(256)],
                      np.uint32)
_HEAD = 33  # PNG signature, IHDR length and type, 13 bytes of IHDR data, its crc


def _crc32_rows(data: np.ndarray) -> np.ndarray:
    """zlib.crc32 of every row of a uint8 matrix at once (a table-driven CRC, vectorised)."""
    crc = np.full(len(data), 0xFFFFFFFF, np.uint32)
    for col in data.T:
        crc = _CRC_TABLE[(crc ^ col) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def stored_sizes(env, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each record's (height, width) from its PNG header, 0 where the key is missing or
    the header is damaged. Touches one page per record, not the whole image."""
    blank, chunks, head = bytes(_HEAD), [], operator.itemgetter(slice(0, _HEAD))
    # A get per key, in meta_info's order (BasicSR's sorted key order: neighbouring pages).
    # One cursor pass in key order measured slower (~1 us a record: a buffer per key too).
    with env.begin(buffers=True) as txn:
        get = txn.get
        for start in range(0, len(keys), 1 << 16):  # chunks: 64K views alive at a time
            part = keys[start:start + (1 << 16)].tolist()  # bytes: numpy scalars are slower
            try:  # the fast path, ~0.6 us a record: a missing key (None) fails the slice
                heads = b"".join(map(head, map(get, part)))  # maps: no bytecode per record
            except TypeError:
                heads = b""
            if len(heads) != len(part) * _HEAD:  # a key missing or a value under 33 bytes
                heads = b"".join(bytes((get(k) or blank)[:_HEAD]).ljust(_HEAD, b"\0")
                                 for k in part)
            chunks.append(heads)
    a = np.frombuffer(b"".join(chunks), np.uint8).reshape(len(keys), _HEAD)
    ok = ((a[:, :8] == np.frombuffer(fmt._PNG, np.uint8)).all(1)
          & (a[:, 12:16] == np.frombuffer(b"IHDR", np.uint8)).all(1)
          & (_crc32_rows(a[:, 12:29]) == a[:, 29:33].copy().view(">u4")[:, 0]))
    w = a[:, 16:20].copy().view(">u4")[:, 0].astype(np.int64)
    h = a[:, 20:24].copy().view(">u4")[:, 0].astype(np.int64)
    return np.where(ok, h, 0), np.where(ok, w, 0)


def sample_ids(n: int, k: int = SAMPLE) -> np.ndarray:
    """``k`` ids of ``n`` evenly spread, the first and the last included (all if fewer)."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(np.int64))


class BasicSRDB:
    """A BasicSR LMDB with PackedDB's reading interface: ``len``, ``read(i)``, ``image(i)``.

    BasicSR stores no sizes or checksums, so ``nbytes`` and ``crc32`` are 0 in every record.
    Sizes come from each PNG's own header, as BasicSR trusts the decoded image: its test
    LMDBs list shapes in meta_info.txt that differ from the stored images (480x500 listed,
    480x492 stored). ``mismatches`` holds ``(id, listed height, listed width)`` of those.
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
        forget_replaced(self.path)  # made again since this process read it: read it anew
        with fmt._NoGC():  # millions of short-lived strings and buffers: see _NoGC
            names, keys, h, w, listed_h, listed_w = self._read_sizes(meta)
        # a missing key or damaged header keeps the listed size: reading it names the key
        known = h > 0
        height, width = np.where(known, h, listed_h), np.where(known, w, listed_w)
        off = np.flatnonzero(known & ((h != listed_h) | (w != listed_w)))
        self.mismatches = [(int(i), int(listed_h[i]), int(listed_w[i])) for i in off]
        n = len(names)
        # channels=3: decode always yields RGB, whatever c (1, 3 or 4) was stored
        self.records = fmt.Index(np.zeros(n), keys, height, width, np.full(n, fmt.CHANNELS),
                                 np.zeros(n), np.zeros(n), fmt.Strings(names))
        self.heights, self.widths = self.records.height, self.records.width
        self._identity = None
        self.manifest = {"format": "basicsr-lmdb", "count": len(self.records),
                         "codec": self.codec, "source_root": str(self.path),
                         "skipped": [], "shards": []}

    @property
    def identity(self) -> str:
        """What this LMDB is, as ``PackedDB.identity``: it has no pack id and its manifest
        is made up from its path, so ``sha256:`` a digest of its meta_info.txt and image
        sizes (all that earlier srpipe versions compared), then ``;data:`` one of its data:
        the LMDB's last transaction id, its page and entry counts, and the whole value of
        ``SAMPLE`` records spread over it; O(SAMPLE), not O(records). A rewrite changes it,
        even with the same names and image sizes (unless it keeps every sampled image, the
        transaction count and the page counts); a move or copy does not. Computed once."""
        if self._identity is None:
            self._identity = f"{self._listing_digest()};data:{self._data_digest()}"
        return self._identity

    def _listing_digest(self) -> str:
        h = hashlib.sha256((self.path / META).read_bytes())
        h.update(np.asarray(self.heights, np.int64).tobytes())
        h.update(np.asarray(self.widths, np.int64).tobytes())
        return "sha256:" + h.hexdigest()

    def _data_digest(self) -> str:
        env = open_shard(self.path)
        info, st = env.info(), env.stat()
        counts = (info["last_txnid"], info["last_pgno"], st["psize"], st["depth"],
                  st["branch_pages"], st["leaf_pages"], st["overflow_pages"], st["entries"])
        h = hashlib.sha256(" ".join(map(str, counts)).encode())
        keys = self.records.keys
        try:
            with env.begin(buffers=True) as txn:
                for i in sample_ids(len(self)):
                    value = txn.get(keys[i])
                    h.update(b"-" if value is None else hashlib.sha256(value).digest())
        except lmdb.Error as e:
            raise fmt.DBError(f"{self.path}: LMDB error: {e}; the LMDB is damaged, copy or "
                              "make it again") from None
        return h.hexdigest()

    def _read_sizes(self, meta: Path) -> tuple:
        """meta_info.txt's names, keys and listed sizes, and each stored PNG's size."""
        names, keys, listed_h, listed_w = _parse_meta(meta)
        try:
            keys = np.array(keys, np.bytes_)
        except UnicodeEncodeError:  # BasicSR writes ASCII keys; others may not
            keys = np.array([k.encode() for k in keys], np.bytes_)
        try:
            h, w = stored_sizes(open_shard(self.path), keys)
        except lmdb.Error as e:
            raise fmt.DBError(f"{self.path}: LMDB error while reading the image headers: "
                              f"{e}; the LMDB is damaged, copy or make it again") from None
        return names, keys, h, w, listed_h, listed_w

    def __len__(self) -> int:
        return len(self.records)

    def read(self, i: int) -> bytes:
        """The PNG bytes of image ``i``; DBError names the key if it is missing."""
        # BasicSR's lmdb dir is itself the environment, so it shares PackedDB's handle table
        try:
            with open_shard(self.path).begin(buffers=False) as txn:
                value = txn.get(self.records.keys[i])
        except lmdb.Error as e:
            rec = self.records[i]
            raise fmt.DBError(f"{self.path}: key {rec.key!r} (image {i}): LMDB error: {e}; "
                              "the LMDB is damaged, copy or make it again") from None
        if value is None:
            rec = self.records[i]
            raise fmt.DBError(f"{self.path}: key {rec.key!r} (image {i}, line {rec.path!r} "
                              f"of {META}) is missing from data.mdb")
        return value

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` as HxWx3 uint8 RGB (gray expanded; alpha dropped, not composited)."""
        value, rec = self.read(i), self.records[i]  # read's own error already names the key
        try:
            return fmt.decode_image(value, self.codec, rec.shape)
        except fmt.DBError as e:
            raise fmt.DBError(f"{self.path}: key {rec.key!r} (from {rec.path}): {e}") from None
