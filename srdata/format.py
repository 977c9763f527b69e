"""The srpipe LMDB database format, specified in one place.

A database is a directory::

    DB/
      manifest.json      format version, creation parameters, count, codec, shards, skipped
      index.json         one row per image; the row number is the image's global id
      shard-00000/       an LMDB environment (data.mdb) holding images 0 .. n0-1
      shard-00001/       images n0 .. n0+n1-1, and so on

Record key: the global id as 8 ASCII digits (``b"00000042"``).
Record value: the image, 8-bit RGB, HWC, encoded by the database's codec:

- ``jpeg``: baseline JPEG, quality ``params.quality``, chroma ``params.subsampling``
  (``444``: full-resolution colour, the default, since 4:2:0 caps fidelity near 36-40 dB
  on saturated edges; ``420``: about 20% smaller);
- ``png``: lossless PNG;
- ``raw``: the bare ``height * width * 3`` uint8 bytes, row-major HWC; no decode at all.

Index row: ``[shard, key, height, width, channels, nbytes, crc32, path]``; ``crc32`` is
zlib.crc32 of the stored value, ``path`` the source file relative to the source root.
Everything is JSON, never pickle. A reader refuses any ``format_version`` but its own.
Bump ``FORMAT_VERSION`` on any change a version-1 reader would misread.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

FORMAT_NAME = "srpipe-lmdb"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.json"
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
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
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


def decode_image(buf: bytes, codec: str, shape: tuple[int, int, int]) -> np.ndarray:
    """Decode a stored value to HxWx3 uint8 RGB; raises DBError if it is not ``shape``."""
    if codec == "raw":
        if len(buf) != shape[0] * shape[1] * shape[2]:
            raise DBError(f"raw record holds {len(buf)} bytes, expected {shape} = "
                          f"{shape[0] * shape[1] * shape[2]}")
        return np.frombuffer(buf, np.uint8).reshape(shape)
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    bgr = cv2.imdecode(np.frombuffer(buf, np.uint8), flags)
    if bgr is None:
        raise DBError(f"{codec} record does not decode ({len(buf)} bytes)")
    if bgr.shape != tuple(shape):
        raise DBError(f"record decodes to {bgr.shape}, expected {tuple(shape)}")
    return np.ascontiguousarray(bgr[:, :, ::-1])


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


def read_manifest(db: str | os.PathLike) -> dict:
    """Read and check ``DB/manifest.json``; DBError names the database and what to do."""
    db = Path(db)
    if not db.exists():
        raise DBError(f"database {db} does not exist; create it with "
                      f"`srdata pack IMAGES {db}`")
    path = db / MANIFEST
    if not path.is_file():
        raise DBError(f"{db} is not an srpipe database (no {MANIFEST}); an interrupted pack "
                      f"never publishes one, so pack again with `srdata pack IMAGES {db} "
                      f"--overwrite`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DBError(f"{path} is unreadable or not JSON ({e}); pack the database again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DBError(f"{path} is not an srpipe manifest (format {manifest.get('format')!r}, "
                      f"expected {FORMAT_NAME!r})" if isinstance(manifest, dict) else
                      f"{path} is not an srpipe manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DBError(f"{db} has format version {version}, this srpipe reads version "
                      f"{FORMAT_VERSION}; repack it with this version's `srdata pack`")
    return manifest


def read_index(db: str | os.PathLike, manifest: dict) -> list[Record]:
    path = Path(db) / manifest.get("index", INDEX)
    try:
        index = json.loads(path.read_text())
        if index["columns"] != list(INDEX_COLUMNS):
            raise ValueError(f"columns {index['columns']}, expected {list(INDEX_COLUMNS)}")
        records = [Record(i, *row) for i, row in enumerate(index["rows"])]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DBError(f"index {path} is missing or malformed ({e}); pack the database "
                      "again") from e
    if len(records) != manifest["count"]:
        raise DBError(f"index {path} lists {len(records)} images, the manifest says "
                      f"{manifest['count']}; pack the database again")
    return records


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
