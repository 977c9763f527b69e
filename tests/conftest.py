import errno
import itertools
import os
import subprocess
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest

from srdata.pack import PackConfig, pack
from srdata.samples import synthetic_image, write_image

# Small images keep the suite fast: pack to 96 px short side, keep anything >= 48 px.
SMALL = dict(size=96, min_size=48, workers=1)


@pytest.fixture
def small_cfg():
    return lambda **kw: PackConfig(**(SMALL | kw))


def run(loader, n=None):
    """The next ``n`` batches (all that are left of the epoch by default), as NHWC numpy."""
    return [(lr.permute(0, 2, 3, 1).numpy().copy(), hr.permute(0, 2, 3, 1).numpy().copy())
            for lr, hr in itertools.islice(loader, n)]


def one_error_line(result):
    """A CliRunner result that failed with one ``Error: ...`` line and no traceback; the line."""
    lines = result.output.strip().splitlines()
    assert result.exit_code not in (0, None) and result.exception is not None, result.output
    assert "Traceback" not in result.output and len(lines) == 1, result.output
    assert lines[0].startswith("Error: "), result.output
    return lines[0]


ROOT = Path(__file__).resolve().parents[1]


def zip_writer_full_disk(f, what: bytes = b"PK part of a file"):
    """What torch.save's zip writer does on a full disk: write part of ``f``, then hide the
    ENOSPC under a RuntimeError of its own ("unexpected pos")."""
    f.write(what)
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                           "4160 vs 4096")


def this_tree(**extra) -> dict:
    """The environment for a script run in a subprocess: it imports srpipe from this tree,
    not from whatever is installed; ``extra``: more variables."""
    return os.environ | {"PYTHONPATH": str(ROOT), **extra}


def read_only_folder(path):
    """``path`` made as a folder nothing can be written in; returns the command undoing it."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return ["chmod", "755", str(path)]
    # root writes through permissions, not into an immutable folder
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("root, and chattr cannot make a read-only folder here")
    return ["chattr", "-i", str(path)]


def make_images(root, sizes, exts=(".png", ".jpg"), seed=0):
    paths = []
    for i, (h, w) in enumerate(sizes):
        ext = exts[i % len(exts)]
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        p = sub / f"im{i:03d}{ext}"
        write_image(p, synthetic_image(h, w, seed + i))
        paths.append(p)
    return paths


@pytest.fixture
def image_dir(tmp_path):
    """Six varied images: portrait, landscape, one already small enough not to resize."""
    root = tmp_path / "images"
    make_images(root, [(120, 160), (200, 130), (96, 96), (150, 150), (100, 250), (180, 140)])
    return root


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def corrupt_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.fixture
def no_root():
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")


def make_basicsr_lmdb(lmdb_path, data_path, img_path_list, keys, compress_level=1):
    """What BasicSR's make_lmdb_from_imgs writes (basicsr/utils/lmdb_util.py), step by step."""
    lmdb_path = str(lmdb_path)
    assert lmdb_path.endswith(".lmdb")
    env = lmdb.open(lmdb_path, map_size=1 << 26)
    txn = env.begin(write=True)
    with open(Path(lmdb_path) / "meta_info.txt", "w") as txt_file:
        for path, key in zip(img_path_list, keys):
            img = cv2.imread(str(Path(data_path) / path), cv2.IMREAD_UNCHANGED)
            h, w, c = (*img.shape, 1) if img.ndim == 2 else img.shape
            _, img_byte = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, compress_level])
            txn.put(key.encode("ascii"), img_byte)
            txt_file.write(f"{key}.png ({h},{w},{c}) {compress_level}\n")
    txn.commit()
    env.close()


@pytest.fixture
def basicsr_db(image_dir, tmp_path):
    """The six conftest images plus a grayscale one whose name holds a dot and a space."""
    cv2.imwrite(str(image_dir / "gray v1.5.png"),
                cv2.cvtColor(cv2.imread(str(image_dir / "b" / "im000.png")), cv2.COLOR_BGR2GRAY))
    files = sorted(str(p.relative_to(image_dir)) for p in image_dir.rglob("*.*"))
    # keys as BasicSR's prepare_keys_reds makes them: the relative path, extension dropped
    keys = [f.rsplit(".", 1)[0] for f in files]
    db = tmp_path / "train_HR.lmdb"
    make_basicsr_lmdb(db, image_dir, files, keys)
    return db, image_dir, files, keys


# Ten varied images for the loader tests, packed once per session and codec.
LOADER_SIZES = [(120, 160), (200, 130), (96, 96), (150, 150), (100, 250), (180, 140),
                (130, 130), (110, 170), (160, 100), (99, 120)]


@pytest.fixture(scope="session")
def packed(tmp_path_factory):
    """``packed(codec)``: the path of a database of LOADER_SIZES images (96 px short side)."""
    root = tmp_path_factory.mktemp("loader-images")
    make_images(root, LOADER_SIZES)
    built = {}

    def get(codec):
        if codec not in built:
            built[codec] = tmp_path_factory.mktemp("db") / codec
            pack(root, built[codec], PackConfig(**(SMALL | {"codec": codec})), progress=False)
        return built[codec]
    return get


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run `pytest -m gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def to_format_v1(db: Path, index_sha256: bool = True) -> None:
    """Rewrite a packed database's index the way version 1 stored it (index.json rows), as
    users' older databases hold it; ``index_sha256=False``: as packed before it existed."""
    import hashlib
    import json

    from srdata import format as fmt
    from srdata.reader import PackedDB
    records = PackedDB(db).records
    rows = [[r.shard, r.key, r.height, r.width, r.channels, r.nbytes, r.crc32, r.path]
            for r in records]
    data = json.dumps({"format_version": 1, "columns": list(fmt.INDEX_COLUMNS),
                       "rows": rows}, indent=1).encode()
    (db / fmt.INDEX).write_bytes(data)
    (db / fmt.INDEX_BIN).unlink()
    manifest = json.loads((db / fmt.MANIFEST).read_text())
    manifest |= {"format_version": 1, "index": fmt.INDEX,
                 "index_sha256": hashlib.sha256(data).hexdigest()}
    if not index_sha256:
        del manifest["index_sha256"]
    (db / fmt.MANIFEST).write_text(json.dumps(manifest, indent=1))
