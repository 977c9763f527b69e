"""The srpipe LMDB database format, specified in one place.

A database is a directory::

    DB/
      manifest.json      format version, creation parameters, count, codec, shards, skipped
      index.bin          every image's metadata as binary columns (version 1: index.json)
      shard-00000/       an LMDB environment (data.mdb) holding images 0 .. n0-1
      shard-00001/       images n0 .. n0+n1-1, and so on (n_k: the manifest's shard count)

Record key: the global id as 8 ASCII digits (``b"00000042"``).
Record value: the image, 8-bit RGB, HWC, encoded by the database's codec:

- ``jpeg``: baseline JPEG, quality ``params.quality``, chroma ``params.subsampling``
  (``444``: full-resolution colour, the default, since 4:2:0 caps fidelity near 36-40 dB
  on saturated edges; ``420``: about 20% smaller);
- ``png``: lossless PNG;
- ``raw``: the bare ``height * width * 3`` uint8 bytes, row-major HWC; no decode at all.

Index, version 2 (``index.bin``; binary, so a million records open in well under a
second): a 16-byte header, the magic ``INDEX_MAGIC`` and ``count`` as little-endian uint64;
then the ``INDEX_BIN_COLUMNS``, each ``count`` little-endian values in id order; then every
image's ``path`` as UTF-8 (surrogatepass), joined by NUL, to the end of the file. The key
and shard columns are not stored: a record's key is its id (above), its shard follows from
the manifest's shard counts, and ``channels`` is always 3.

Index, version 1 (``index.json``, still read): ``{"format_version": 1, "columns": [...],
"rows": [...]}``, one row per image ``[shard, key, height, width, channels, nbytes, crc32,
path]``; parsing a million rows takes seconds.

In both, ``crc32`` is zlib.crc32 of the stored value and ``path`` the source file relative
to the source root. Metadata is JSON or plain little-endian arrays, never pickle. A reader
refuses any ``format_version`` not in ``READ_VERSIONS``; bump ``FORMAT_VERSION`` on any
change an older reader would misread.

Integrity, all checked by the reader: every value's crc32 on every read; ``index.json``
against the manifest's ``index_sha256``; each ``data.mdb``'s size against the LMDB's last
used page when a process opens it; and the manifest's ``id`` (a uuid4 hex, new for every
pack) when a process opens a shard, so a database re-packed under a running reader is
refused, not mixed. ``index_sha256`` (of whichever file holds the index) is required from
version 2 on; in version 1, it and ``id`` are optional: older databases lack them.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import os
import re
import stat
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

FORMAT_NAME = "srpipe-lmdb"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
INDEX = "index.json"  # version 1
INDEX_BIN = "index.bin"  # version 2
INDEX_MAGIC = b"SRPIDX\x00\x02"
# the 8-byte column first: every column then starts aligned to its item size
INDEX_BIN_COLUMNS = (("nbytes", "<u8"), ("crc32", "<u4"), ("height", "<u4"), ("width", "<u4"))
CODECS = ("jpeg", "png", "raw")
INDEX_COLUMNS = ("shard", "key", "height", "width", "channels", "nbytes", "crc32", "path")
CHANNELS = 3
SUBSAMPLINGS = ("444", "420")
# Raised well above workers x threads: every reader thread in every worker holds a slot.
MAX_READERS = 2048


class DBError(ValueError):
    """A database that cannot be used as asked; the message names the database or key."""


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def record_key(global_id: int) -> bytes:
    return b"%08d" % global_id


def encode_image(rgb: np.ndarray, codec: str, quality: int = 95,
                 subsampling: str = "444") -> bytes:
    """Encode an HxWx3 uint8 RGB image as stored under ``codec``."""
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == CHANNELS, rgb.shape
    if codec == "raw":
        return np.ascontiguousarray(rgb).tobytes()
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # not cvtColor: see decode_image
    if codec == "jpeg":
        factor = {"444": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
                  "420": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420}[subsampling]
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality),
                  cv2.IMWRITE_JPEG_SAMPLING_FACTOR, factor]
        ok, buf = cv2.imencode(".jpg", bgr, params)
    elif codec == "png":
        # level 1: PNG decode time barely depends on the level, packing time does
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    else:
        raise ValueError(f"unknown codec {codec!r}, expected one of {', '.join(CODECS)}")
    if not ok:
        raise RuntimeError(f"OpenCV failed to encode a {rgb.shape} image as {codec}")
    return buf.tobytes()


_DECODES_RGB = hasattr(cv2, "IMREAD_COLOR_RGB")
_DECODE_FLAGS = ((cv2.IMREAD_COLOR_RGB if _DECODES_RGB else cv2.IMREAD_COLOR)
                 | cv2.IMREAD_IGNORE_ORIENTATION)


def decode_image(buf: bytes, codec: str, shape: tuple[int, int, int]) -> np.ndarray:
    """Decode a stored value to HxWx3 uint8 RGB; raises DBError if it is not ``shape``."""
    if codec == "raw":
        if len(buf) != shape[0] * shape[1] * shape[2]:
            raise DBError(f"raw record holds {len(buf)} bytes, expected {shape} = "
                          f"{shape[0] * shape[1] * shape[2]}")
        return np.frombuffer(buf, np.uint8).reshape(shape)
    img = cv2.imdecode(np.frombuffer(buf, np.uint8), _DECODE_FLAGS)
    if img is None:
        raise DBError(f"{codec} record does not decode ({len(buf)} bytes)")
    if img.shape != tuple(shape):
        raise DBError(f"record decodes to {img.shape}, expected {tuple(shape)}")
    # Straight to RGB where OpenCV can (>= 4.11): numpy copies a reversed 3-byte axis one
    # element at a time, 0.7 of a 512² JPEG's 1.75 ms decode in the torch loader. Not
    # cvtColor: it starts OpenCV's thread pool, and a process forked after that hangs in
    # cv2.setNumThreads (a user's fork-based DataLoader over this reader).
    return img if _DECODES_RGB else np.ascontiguousarray(img[:, :, ::-1])


def crc32(buf: bytes) -> int:
    return zlib.crc32(buf) & 0xFFFFFFFF


@dataclass(frozen=True)
class Record:
    """One index row: where an image is stored and what it must decode to."""
    id: int
    shard: int
    key: str
    height: int
    width: int
    channels: int
    nbytes: int
    crc32: int
    path: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)


class Strings:
    """Many strings as one NUL-joined UTF-8 blob instead of a Python object each; pickled
    compressed (source paths repeat their folders), unpacked on first use."""

    def __init__(self, items):
        items = list(items)
        self._n = len(items)
        self._blob = "\0".join(items).encode("utf-8", "surrogatepass")
        if self._blob.count(0) != max(0, self._n - 1):
            raise ValueError("a string holds a NUL character")
        self._packed = self._bounds = None

    @classmethod
    def from_blob(cls, blob: bytes, n: int) -> "Strings":
        """``n`` strings NUL-joined as UTF-8 (surrogatepass), as index.bin holds them."""
        if blob.count(0) != max(0, n - 1):
            raise ValueError(f"the paths hold {blob.count(0) + 1 if blob else 0} "
                             f"NUL-separated strings, expected {n}")
        strings = cls([])
        strings._n, strings._blob = n, bytes(blob)
        return strings

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> str:
        blob = self._blob
        if blob is None:
            blob = self._blob = zlib.decompress(self._packed)
        if self._bounds is None:  # one assignment: threads may race here, harmlessly
            nul = np.flatnonzero(np.frombuffer(blob, np.uint8) == 0)
            self._bounds = (np.concatenate([[0], nul + 1]), np.append(nul, len(blob)))
        starts, ends = self._bounds
        return blob[starts[i]:ends[i]].decode("utf-8", "surrogatepass")

    def __eq__(self, other) -> bool:
        return isinstance(other, Strings) and list(self) == list(other)

    def __iter__(self):
        return (self[i] for i in range(self._n))

    def __getstate__(self):
        if self._packed is None:
            self._packed = zlib.compress(self._blob, 1)
        return {"n": self._n, "packed": self._packed}

    def __setstate__(self, state):
        self._n, self._packed = state["n"], state["packed"]
        self._blob = self._bounds = None


class Index:
    """Every record's metadata as numpy columns (a million records cost ~40 MB, not a
    Python object each); ``index[i]`` is record ``i`` as a ``Record``."""

    def __init__(self, shard, keys, height, width, channels, nbytes, crc32, paths):
        self.shard = np.asarray(shard, np.int32)
        self.keys = np.asarray(keys, np.bytes_)  # fixed width; LMDB keys hold no NUL
        self.height = np.asarray(height, np.int64)
        self.width = np.asarray(width, np.int64)
        self.channels = np.asarray(channels, np.uint8)
        self.nbytes = np.asarray(nbytes, np.int64)
        self.crc32 = np.asarray(crc32, np.uint32)
        self.paths = paths if isinstance(paths, Strings) else Strings(paths)

    def __len__(self) -> int:
        return len(self.height)

    def __getitem__(self, i: int) -> Record:
        i = range(len(self))[i]  # IndexError past the end, negative ids count back
        return Record(i, int(self.shard[i]), self.keys[i].decode(), int(self.height[i]),
                      int(self.width[i]), int(self.channels[i]), int(self.nbytes[i]),
                      int(self.crc32[i]), self.paths[i])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        if not isinstance(other, Index):
            return NotImplemented
        cols = ("shard", "keys", "height", "width", "channels", "nbytes", "crc32")
        return (all(np.array_equal(getattr(self, c), getattr(other, c)) for c in cols)
                and self.paths == other.paths)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _bad_index(path: Path, what: str) -> DBError:
    return DBError(f"index {path} {what}; pack the database again")


_INDEX_MODIFIED = ("was modified after packing (its sha256 differs from the manifest's "
                   "index_sha256)")


def _bad_manifest(path: Path, what: str) -> DBError:
    return DBError(f"{path}: {what}; the manifest was edited or damaged, pack the database "
                   "again")


def read_manifest(db: str | os.PathLike) -> dict:
    """Read and check ``DB/manifest.json``; DBError names the database and what to do."""
    db = Path(db)
    if not db.exists():
        raise DBError(f"database {db} does not exist; create it with "
                      f"`srdata pack IMAGES {db}`")
    path = db / MANIFEST
    if db.name == MANIFEST and db.is_file():
        raise DBError(f"{db} is a database's manifest; name the database folder, "
                      f"{db.parent}")
    if not path.is_file():
        # not a half-written database (a pack publishes the folder whole, manifest and
        # all), so --overwrite would refuse it too: point elsewhere or pack a new one
        raise DBError(f"{db} is not an srpipe database (no {MANIFEST}); name the folder "
                      f"that `srdata pack IMAGES DB` wrote, or pack one into a new DB path")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DBError(f"{path} is unreadable or not JSON ({e}); pack the database again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DBError(f"{path} is not an srpipe manifest (format {manifest.get('format')!r}, "
                      f"expected {FORMAT_NAME!r})" if isinstance(manifest, dict) else
                      f"{path} is not an srpipe manifest")
    version = manifest.get("format_version")
    if type(version) is not int:  # "1" or 1.0 would pass a plain != and mislead below
        raise _bad_manifest(path, f"format_version is {version!r}, expected an integer "
                                  f"({', '.join(map(str, READ_VERSIONS))})")
    if version not in READ_VERSIONS:
        raise DBError(f"{db} has format version {version}, this srpipe reads versions "
                      f"{', '.join(map(str, READ_VERSIONS))}; repack it with this version's "
                      "`srdata pack`")
    count, shards = manifest.get("count"), manifest.get("shards")
    if type(count) is not int or count < 1:
        raise _bad_manifest(path, f"count is {count!r}, expected a positive integer")
    if not isinstance(shards, list) or not shards or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str) for s in shards):
        raise _bad_manifest(path, "shards is not a list of {\"name\": ...} entries")
    return manifest


def identity(manifest: dict) -> str:
    """What tells one pack of a database from another: the manifest's ``id``, or for a
    database packed before ids existed a digest of its manifest (creation time, checksums)."""
    if manifest.get("id"):
        return str(manifest["id"])
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


# the ranges both index versions accept for a column (the rest is fixed by the format)
COLUMN_BOUNDS = {"height": (1, 1 << 31), "width": (1, 1 << 31), "nbytes": (1, 1 << 40)}


def _column(values: tuple, name: str, lo: int, hi: int) -> np.ndarray:
    """An integer index column, or the first row that is not an integer in lo..hi."""
    a = np.array(values)  # numpy infers the dtype: a string or float anywhere shows in it
    if a.dtype.kind not in "iu" or a.ndim != 1:
        i = next((i for i, v in enumerate(values) if type(v) is not int), 0)
        raise ValueError(f"row {i} has {name} {values[i]!r}, expected an integer")
    bad = np.flatnonzero((a < lo) | (a > hi))
    if bad.size:
        raise ValueError(f"row {bad[0]} has {name} {values[bad[0]]}, expected {lo}..{hi}")
    return a


def index_from_rows(rows: list, shards: int) -> Index:
    """Check the index rows (types and ranges, vectorised) and turn them into columns."""
    if not isinstance(rows, list) or not rows:
        raise ValueError("rows is not a non-empty list")
    try:  # (a row that is not a list fails a column's type check below)
        widths = set(map(len, rows))
    except TypeError:
        widths = None
    if widths != {len(INDEX_COLUMNS)}:
        i = next(i for i, r in enumerate(rows)
                 if not isinstance(r, list) or len(r) != len(INDEX_COLUMNS))
        raise ValueError(f"row {i} is {rows[i]!r:.80}, expected [{', '.join(INDEX_COLUMNS)}]")
    shard, keys, height, width, channels, nbytes, crc, paths = zip(*rows)
    for name, col in (("key", keys), ("path", paths)):
        try:
            "".join(col)  # fails on anything but strings, at C speed (numpy would convert)
        except TypeError:
            i = next(i for i, v in enumerate(col) if type(v) is not str)
            raise ValueError(f"row {i} has {name} {col[i]!r}, expected a string") from None
    try:
        keys = np.array(keys, np.bytes_)
    except UnicodeEncodeError as e:
        raise ValueError(f"a key is not ASCII ({e})") from None
    return Index(_column(shard, "shard", 0, shards - 1), keys,
                 _column(height, "height", *COLUMN_BOUNDS["height"]),
                 _column(width, "width", *COLUMN_BOUNDS["width"]),
                 _column(channels, "channels", CHANNELS, CHANNELS),
                 _column(nbytes, "nbytes", *COLUMN_BOUNDS["nbytes"]),
                 _column(crc, "crc32", 0, 0xFFFFFFFF),
                 Strings(paths))


class _NoGC:
    """Pause the cyclic garbage collector: parsing a million rows allocates millions of
    lists it would otherwise scan again and again (half the parse time)."""

    def __enter__(self):
        self.was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        if self.was:
            gc.enable()


def record_keys(n: int) -> np.ndarray:
    """``record_key(i)`` of ids 0 .. n-1 as a fixed-width bytes array, vectorised."""
    if n > 10 ** 8:  # keys beyond 8 digits grow: no fixed width
        return np.array([record_key(i) for i in range(n)], np.bytes_)
    ids, digits = np.arange(n, dtype=np.int64), np.empty((n, 8), np.uint8)
    for d in range(8):
        digits[:, 7 - d] = ids // 10 ** d % 10 + ord("0")
    return digits.view("S8").ravel()


def shard_column(shards: list, count: int) -> np.ndarray:
    """Each id's shard number: shard k holds the manifest's ``count`` of k ids, in order."""
    counts = [s.get("count") for s in shards]
    if not all(type(c) is int and c >= 0 for c in counts) or sum(counts) != count:
        raise ValueError(f"the shards' counts {counts[:8]!r:.80} do not add up to the "
                         f"manifest's count {count}")
    return np.repeat(np.arange(len(counts), dtype=np.int32), counts)


def write_index(db: Path, rows: list, shards: list) -> str:
    """Write ``db/index.bin`` (version 2) from pack's rows, one per id ``[shard, key,
    height, width, channels, nbytes, crc32, path]``; returns the file name."""
    shard, keys, height, width, channels, nbytes, crc, paths = zip(*rows)
    assert np.array_equal(shard, shard_column(shards, len(rows))), "shards out of id order"
    assert set(channels) == {CHANNELS} and keys == tuple(
        record_keys(len(rows)).astype(str)), "keys are not the ids"
    columns = {"nbytes": nbytes, "crc32": crc, "height": height, "width": width}
    with atomic_file(db / INDEX_BIN, "wb") as f:
        f.write(INDEX_MAGIC + struct.pack("<Q", len(rows)))
        for name, dtype in INDEX_BIN_COLUMNS:
            f.write(np.asarray(columns[name], dtype).tobytes())
        f.write("\0".join(paths).encode("utf-8", "surrogatepass"))
    return INDEX_BIN


def index_from_bin(data: bytes, manifest: dict) -> Index:
    """Check and unpack a version-2 index.bin (see the module's docstring)."""
    if len(data) < 16 or data[:8] != INDEX_MAGIC:
        raise ValueError(f"it does not start with {INDEX_MAGIC!r} and a count")
    n = struct.unpack_from("<Q", data, 8)[0]
    if n != manifest["count"]:
        raise ValueError(f"it lists {n} images, the manifest says {manifest['count']}")
    columns, offset = {}, 16
    for name, dtype in INDEX_BIN_COLUMNS:
        size = np.dtype(dtype).itemsize * n
        if offset + size > len(data):
            raise ValueError(f"it ends inside the {name} column ({len(data)} bytes)")
        # astype copies: no column keeps the whole file alive
        columns[name] = np.frombuffer(data, dtype, n, offset).astype(
            np.uint32 if name == "crc32" else np.int64)
        offset += size
    for name, (lo, hi) in COLUMN_BOUNDS.items():
        bad = np.flatnonzero((columns[name] < lo) | (columns[name] > hi))
        if bad.size:
            raise ValueError(f"image {bad[0]} has {name} {columns[name][bad[0]]}, expected "
                             f"{lo}..{hi}")
    return Index(shard_column(manifest["shards"], n), record_keys(n), columns["height"],
                 columns["width"], np.full(n, CHANNELS, np.uint8), columns["nbytes"],
                 columns["crc32"], Strings.from_blob(data[offset:], n))


def read_index(db: str | os.PathLike, manifest: dict) -> Index:
    version = manifest["format_version"]
    path = Path(db) / manifest.get("index", INDEX if version == 1 else INDEX_BIN)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _bad_index(path, f"is missing or unreadable ({e})") from e
    expected = manifest.get("index_sha256")  # absent in databases packed before it existed
    if version != 1:
        return _read_index_bin(path, data, manifest, expected)
    with ThreadPoolExecutor(1) as pool:  # hashlib releases the GIL: hash while JSON parses
        digest = pool.submit(lambda: hashlib.sha256(data).hexdigest())
        try:
            with _NoGC():
                index = json.loads(data)
                if not isinstance(index, dict) or index.get("columns") != list(INDEX_COLUMNS):
                    raise ValueError(f"columns are not {list(INDEX_COLUMNS)}")
                records = index_from_rows(index.get("rows"), len(manifest["shards"]))
            problem = None
        except (ValueError, TypeError, RecursionError) as e:
            problem = e
    if expected is not None and digest.result() != expected:
        raise _bad_index(path, _INDEX_MODIFIED)
    if problem is not None:
        raise _bad_index(path, f"is malformed: {problem}") from problem
    if len(records) != manifest["count"]:
        raise _bad_index(path, f"lists {len(records)} images, the manifest says "
                               f"{manifest['count']}")
    return records


def _read_index_bin(path: Path, data: bytes, manifest: dict, expected) -> Index:
    if not isinstance(expected, str):  # required from version 2 on: every pack writes it
        raise _bad_manifest(path.parent / MANIFEST, f"index_sha256 is {expected!r}, "
                                                   "expected the index's sha256")
    if hashlib.sha256(data).hexdigest() != expected:
        raise _bad_index(path, _INDEX_MODIFIED)
    try:
        return index_from_bin(data, manifest)
    except ValueError as e:
        raise _bad_index(path, f"is malformed: {e}") from None


_PNG = b"\x89PNG\r\n\x1a\n"
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def encoded_shape(buf, codec: str) -> tuple[int, int] | None:
    """(height, width) from a PNG's IHDR or a JPEG's frame header, without decoding; None
    when the header is damaged (a PNG's IHDR carries its own crc) or the codec is raw."""
    if codec == "png":
        if len(buf) < 33 or bytes(buf[:8]) != _PNG or bytes(buf[12:16]) != b"IHDR":
            return None
        if zlib.crc32(buf[12:29]) != struct.unpack(">I", buf[29:33])[0]:
            return None
        w, h = struct.unpack(">II", buf[16:24])
        return h, w
    if codec != "jpeg" or bytes(buf[:2]) != b"\xff\xd8":
        return None
    i, n = 2, len(buf)
    while i + 9 <= n:  # marker segments up to the frame header, usually a handful
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _SOF:
            h, w = struct.unpack(">HH", buf[i + 5:i + 9])
            return h, w
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
            i += 2
        else:
            i += 2 + struct.unpack(">H", buf[i + 2:i + 4])[0]
    return None


class NotOurFile(OSError):
    """A name srpipe writes its own file under holds something srpipe did not make there (a
    symbolic link, a hard link, a folder); srpipe neither writes through it nor deletes it."""

    def __init__(self, message: str):
        super().__init__(errno.EEXIST, message)

    def __str__(self) -> str:
        return self.strerror


_OWN = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


def _foreign(path: Path, st: os.stat_result) -> str:
    """Why an existing ``path`` (``st``: its lstat) is not a file srpipe made, "" if it may be:
    a regular file with no other name (writing through a hard link would change the user's
    file under its other name)."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_nlink > 1:
        return f"has {st.st_nlink - 1} other hard link(s)"
    return ""


def not_our_file(path: Path, why: str) -> NotOurFile:
    return NotOurFile(f"{path} {why}, so srpipe did not make it; srpipe neither writes "
                      "through nor deletes it: move it away, then run this again")


def open_own(path: Path) -> int:
    """A read-write descriptor of ``path``, created if missing, that is srpipe's own file:
    never through a symbolic link, nor a file with other hard links (NotOurFile)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _OWN, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW's answer to a symbolic link
            raise not_our_file(path, "is a symbolic link") from None
        raise
    why = _foreign(path, os.fstat(fd))
    if why:
        os.close(fd)
        raise not_our_file(path, why)
    return fd


def create_own(path: Path) -> int:
    """A write descriptor of the new file ``path`` (O_EXCL: a link there is never followed).
    A regular file there with no other name is our own leftover (the name holds this
    process's id, so a process that ended by a signal wrote it) and is replaced; anything
    else is NotOurFile."""
    for _ in range(2):
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OWN, 0o644)
        except FileExistsError:
            why = _foreign(path, os.lstat(path))
            if why:
                raise not_our_file(path, why) from None
            os.unlink(path)
    raise not_our_file(path, "keeps coming back")


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w"):
    """A file to write ``path`` through: ``path`` ends up holding the whole of what was
    written or what it held before, never a part. The temporary file (``.NAME.tmp-PID``:
    hidden, and one per process, so two writers never share one) is created new, never
    through a link (``create_own``), and removed when a write fails; an OSError (a full
    disk) names ``path``, not the temporary file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = create_own(tmp)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # ours: created above, under this process's name
        if isinstance(e, OSError) and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def atomic_temporaries(*names: str) -> str:
    """A regular expression (unanchored) for the temporary files ``atomic_file`` writes
    while it replaces files by these ``names``: what a run killed mid-write leaves."""
    return r"\.(?:%s)\.tmp-\d+" % "|".join(re.escape(n) for n in names)


def write_json_atomic(path: Path, obj, indent: int = 1) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=indent)
