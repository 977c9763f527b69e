"""Pack a folder of images into an srpipe database (see ``srdata.format``).

Worker processes read, orient, convert, resize and encode the images (the costly part);
the parent writes the encoded bytes to LMDB in order (cheap: a memcpy per image), so the
writer never serialises the job and the output is the same for any number of workers.
The database is built in a hidden sibling directory and renamed into place when complete:
a killed pack leaves no directory that looks like a database (``srdata.publish``).
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import lmdb
from tqdm import tqdm

from . import __version__
from . import format as fmt
from . import images
from . import publish as pub
from ._proc import die_with_parent
from .publish import Interrupted, PackError, check_destination  # noqa: F401
from .walk import display, walk

GiB = 1 << 30


@dataclass(frozen=True)
class PackConfig:
    size: int = 512
    fit: str = "short"
    codec: str = "jpeg"
    quality: int = 95
    subsampling: str = "444"
    min_size: int = 256
    max_pixels: int = 100_000_000
    shard_size: int | None = None  # None: about 1 GiB per shard
    workers: int = 0  # 0: all cores; 1 .. n: that many worker processes

    def __post_init__(self):
        if self.fit not in images.FITS:
            raise ValueError(f"fit={self.fit!r}, expected one of {images.FITS}")
        if self.codec not in fmt.CODECS:
            raise ValueError(f"codec={self.codec!r}, expected one of {fmt.CODECS}")
        if self.subsampling not in fmt.SUBSAMPLINGS:
            raise ValueError(f"subsampling={self.subsampling!r}, expected one of "
                             f"{fmt.SUBSAMPLINGS}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality={self.quality}, expected 1..100")
        for name in ("size", "min_size", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}, expected a positive number")
        if self.shard_size is not None and self.shard_size < 1:
            raise ValueError(f"shard_size={self.shard_size}, expected a positive number")
        if self.workers < 0:
            raise ValueError(f"workers={self.workers}, expected 0 (all cores) or more")

    def resolved_shard_size(self) -> int:
        if self.shard_size is not None:
            return self.shard_size
        # bytes per image for a 4:3 photo at `size`; ratios measured by benchmarks/codecs.py
        ratio = {"raw": 1.0, "png": 0.6, "jpeg": 0.15 if self.quality <= 95 else 0.3}
        est = self.size * self.size * 4 / 3 * fmt.CHANNELS * ratio[self.codec]
        return max(1, int(GiB // est))

    def resolved_workers(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))


def _reasons(skipped: list[dict]) -> str:
    """The first five skipped files and why, for a message."""
    return "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:5])


def _init_worker(parent: int, by_main_thread: bool):
    import cv2
    from PIL import Image
    # a killed pack must not leave its idle workers behind for good
    die_with_parent(parent, by_main_thread)
    cv2.setNumThreads(1)  # one image per process; OpenCV's own threads would oversubscribe
    Image.MAX_IMAGE_PIXELS = None  # PackConfig.max_pixels is the cap, checked before decode


def _process(job: tuple[bytes, bytes, PackConfig]):
    """(rel, value, shape) for a packed image, (rel, None, reason) for a skipped one."""
    root, rel, cfg = job
    try:
        rgb = images.resize(images.load_rgb(os.path.join(root, rel), cfg.max_pixels),
                            cfg.size, cfg.fit)
        if min(rgb.shape[:2]) < cfg.min_size:
            h, w = rgb.shape[:2]
            raise images.Skip(f"too small: {w}x{h} px after resize, below --min-size "
                              f"{cfg.min_size}")
        return rel, fmt.encode_image(rgb, cfg.codec, cfg.quality, cfg.subsampling), rgb.shape
    except images.Skip as e:
        return rel, None, str(e)
    except Exception as e:  # a bug or a library failure on one file must not lose the pack
        return rel, None, f"failed: {type(e).__name__}: {e}"


class _ShardWriter:
    """Writes records in order, starting a new LMDB shard every ``per_shard`` images."""

    def __init__(self, root: Path, per_shard: int):
        self.root, self.per_shard = root, per_shard
        self.shards: list[dict] = []
        self.env = self.txn = None
        self.map_size = 4 * GiB
        self.seconds = 0.0

    def put(self, key: bytes, value: bytes) -> int:
        t0 = time.perf_counter()
        if self.env is None or self.shards[-1]["count"] == self.per_shard:
            self._close_shard()
            self._open_shard()
        shard = self.shards[-1]
        while True:
            try:
                self.txn.put(key, value)
                break
            except lmdb.MapFullError:
                self.txn.abort()  # loses this txn's uncommitted puts: replay them
                self.map_size *= 2
                self.env.set_mapsize(self.map_size)
                self.txn = self.env.begin(write=True)
                for k, v in shard["_pending"]:
                    self.txn.put(k, v)
        shard["_pending"].append((key, value))
        shard["count"] += 1
        if len(shard["_pending"]) >= 64:
            self.txn.commit()
            self.txn = self.env.begin(write=True)
            shard["_pending"] = []
        self.seconds += time.perf_counter() - t0
        return len(self.shards) - 1

    def _open_shard(self):
        name = fmt.shard_name(len(self.shards))
        self.env = lmdb.open(str(self.root / name), map_size=self.map_size, subdir=True,
                             readahead=False, meminit=False, sync=False)
        self.txn = self.env.begin(write=True)
        self.shards.append({"name": name, "count": 0, "_pending": []})

    def _close_shard(self):
        if self.env is None:
            return
        self.txn.commit()
        self.env.sync(True)
        self.env.close()
        self.env = self.txn = None
        shard = self.shards[-1]
        del shard["_pending"]
        data = self.root / shard["name"] / "data.mdb"
        (self.root / shard["name"] / "lock.mdb").unlink(missing_ok=True)  # readers use none
        shard["bytes"], shard["sha256"] = data.stat().st_size, fmt.sha256_file(data)

    def close(self) -> list[dict]:
        try:
            self._close_shard()
        except BaseException:
            self.abort()
            raise
        return self.shards

    def abort(self) -> None:
        """After a failure (a full disk, Ctrl-C): let go of the shard without committing,
        so no open file keeps the removed partial directory's space."""
        if self.env is not None:
            self.env.close()  # aborts the open write transaction
            self.env = self.txn = None


def pack(src: str | os.PathLike, dst: str | os.PathLike, cfg: PackConfig,
         overwrite: bool = False, progress: bool = True) -> dict:
    """Pack ``src`` into the database ``dst``; returns the summary (also in the manifest).

    ``overwrite`` replaces only a database that srpipe wrote, never IMAGES or other files.
    """
    src, shown = Path(src), Path(dst)
    # a symlinked DB is written where it points, so the swap stays on one file system;
    # an absolute path gives "." or "x/.." a name for the lock and the swap
    dst = Path((os.path.realpath if shown.is_symlink() and shown.is_dir() else
                os.path.abspath)(shown))
    if not src.is_dir():
        raise PackError(f"image folder {src} does not exist or is not a directory")
    pub.prepare_parent(dst)
    with pub.locked(dst):
        pub.repair(dst)  # what a killed pack left, before looking at DB
        try:
            check_destination(dst, overwrite, src)
        except OSError as e:
            raise PackError(f"cannot read {dst}: {e.strerror}; choose another DB path") from None
        summary = _pack_locked(src, dst, cfg, progress)
    summary["db"] = str(shown)
    return summary


def _pack_locked(src: Path, dst: Path, cfg: PackConfig, progress: bool) -> dict:
    try:  # DB and our names next to it are left out wherever the walk meets them
        files, skipped = walk(src, dst, pub.own_names(dst))
    except OSError as e:
        raise PackError(f"cannot read the image folder {src}: {e.strerror}") from None
    if not files:
        reasons = _reasons(skipped)
        raise PackError(f"{src} holds no files{f' to pack ({reasons})' if reasons else ''}; "
                        "point IMAGES at a folder of images")

    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    try:  # a killed pack's folder by this name is gone (pub.repair): one left is not a pack's
        tmp.mkdir()
    except FileExistsError:
        raise PackError(f"{tmp} is in the way: a pack builds the database there, and what "
                        "it holds is not a pack's; move it away, then pack again") from None
    except OSError as e:
        raise PackError(pub.write_failure(dst, e)) from e
    try:  # tmp is ours from here on: removed on any failure
        summary = _pack_into(src, files, tmp, cfg, progress, skipped)
        pub.publish(tmp, dst)
    except (OSError, lmdb.Error) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PackError(pub.write_failure(dst, e)) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _pack_into(src: Path, files: list[bytes], tmp: Path, cfg: PackConfig,
               progress: bool, walk_skipped: list[dict] = ()) -> dict:
    t0 = time.perf_counter()
    root = os.fsencode(src)
    jobs = ((root, rel, cfg) for rel in files)
    writer = _ShardWriter(tmp, cfg.resolved_shard_size())
    rows, skipped = [], list(walk_skipped)
    workers = cfg.resolved_workers()
    bar = tqdm(total=len(files), unit="img", disable=not progress, desc="packing",
               dynamic_ncols=True)
    # An executor, not mp.Pool: a worker that dies (OOM kill, a script without a main
    # guard re-importing itself under spawn) fails the pack instead of hanging it forever.
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                               initializer=_init_worker,
                               initargs=(os.getpid(), threading.current_thread() is
                                         threading.main_thread()))
    try:
        for rel, value, info in pool.map(_process, jobs, chunksize=4):
            bar.update()
            if value is None:
                skipped.append({"path": display(rel), "reason": info})
                continue
            gid = len(rows)
            shard = writer.put(fmt.record_key(gid), value)
            h, w, c = info
            rows.append([shard, fmt.record_key(gid).decode(), h, w, c, len(value),
                         fmt.crc32(value), display(rel)])
    except BrokenProcessPool as e:
        writer.abort()
        raise PackError("a packing worker process died (out of memory?); if you call "
                        "srdata.pack from a script, put the call under "
                        "`if __name__ == '__main__':`") from e
    except BaseException:
        writer.abort()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    shards = writer.close()
    if not rows:
        reasons = _reasons(skipped)
        raise PackError(f"no image in {src} could be packed ({len(skipped)} skipped: "
                        f"{reasons}{' ...' if len(skipped) > 5 else ''})")
    seconds = time.perf_counter() - t0
    total_bytes = sum(r[5] for r in rows)
    manifest = {
        "format": fmt.FORMAT_NAME,
        "format_version": fmt.FORMAT_VERSION,
        "srpipe_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_root": str(src.resolve()),
        "params": {k: v for k, v in asdict(cfg).items() if k not in ("workers", "shard_size")}
        | {"shard_size": writer.per_shard},
        "count": len(rows),
        "codec": cfg.codec,
        "bytes": total_bytes,
        "index": fmt.INDEX_BIN,
        "shards": shards,
        "skipped": skipped,
        "pack_stats": {"seconds": round(seconds, 3), "workers": workers,
                       "images_per_s": round((len(rows) + len(skipped)) / seconds, 1),
                       "writer_seconds": round(writer.seconds, 3)},
    }
    index = fmt.write_index(tmp, rows, shards)
    # what readers check: a new id per pack, and the index's own checksum
    manifest |= {"id": uuid.uuid4().hex, "index_sha256": fmt.sha256_file(tmp / index)}
    fmt.write_json_atomic(tmp / fmt.MANIFEST, manifest)  # last: its presence means complete
    return manifest

