"""``srdata``: pack, inspect, verify and warm srpipe databases (and BasicSR LMDBs)."""
from __future__ import annotations

import json
import logging
import sys

import click

from . import format as fmt
from . import images
from .pack import Interrupted, PackConfig, PackError, pack
from .reader import open_db

SHOWN_SKIPS = 20


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024


def _open(db: str):
    try:
        return open_db(db)
    except fmt.DBError as e:
        raise click.ClickException(str(e)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="srpipe")
def main():
    """Pack image folders into LMDB databases for fast super-resolution training."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")


@main.command("pack")
@click.argument("images_dir", metavar="IMAGES", type=click.Path(file_okay=False))
@click.argument("db", metavar="DB", type=click.Path())
@click.option("--size", default=512, type=click.IntRange(min=1),
              help="Pre-resize so the --fit side is this many pixels (never upscales).")
@click.option("--fit", default="short", type=click.Choice(images.FITS),
              help="Which side --size applies to; 'none' keeps the original size.")
@click.option("--codec", default="jpeg", type=click.Choice(fmt.CODECS),
              help="How records are stored: jpeg (small), png (lossless), raw (no decode).")
@click.option("--quality", default=95, type=click.IntRange(1, 100), help="JPEG quality.")
@click.option("--subsampling", default="444", type=click.Choice(fmt.SUBSAMPLINGS),
              help="JPEG chroma: 444 keeps full colour detail, 420 is ~20% smaller.")
@click.option("--min-size", default=256, type=click.IntRange(min=1),
              help="Skip images whose short side is below this after resizing (one HR patch).")
@click.option("--max-pixels", default=100_000_000, type=click.IntRange(min=1),
              help="Skip images with more pixels than this (decompression bombs).")
@click.option("--workers", default=0, type=click.IntRange(min=0),
              help="Worker processes; 0 uses every core.")
@click.option("--shard-size", default=None, type=click.IntRange(min=1),
              help="Images per LMDB shard  [default: about 1 GiB per shard]")
@click.option("--overwrite", is_flag=True,
              help="Replace DB if it is an srpipe database (never any other folder).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def pack_cmd(images_dir, db, size, fit, codec, quality, subsampling, min_size, max_pixels,
             workers, shard_size, overwrite, quiet):
    """Pack the images under IMAGES (recursively) into the database DB.

    Every file is either packed (as 8-bit RGB, EXIF orientation applied, transparency
    composited on white) or listed with its reason in the manifest's skipped list.
    """
    cfg = PackConfig(size=size, fit=fit, codec=codec, quality=quality,
                     subsampling=subsampling, min_size=min_size,
                     max_pixels=max_pixels, shard_size=shard_size, workers=workers)
    try:
        m = pack(images_dir, db, cfg, overwrite=overwrite, progress=not quiet)
    except PackError as e:
        raise click.ClickException(str(e)) from None
    except Interrupted as e:  # after the new database was in place
        click.echo(f"interrupted: {e}", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo(f"interrupted: nothing was written to {db}", err=True)
        sys.exit(130)
    for s in m["skipped"][:SHOWN_SKIPS]:
        click.echo(f"skipped {s['path']}: {s['reason']}", err=True)
    if len(m["skipped"]) > SHOWN_SKIPS:
        click.echo(f"... and {len(m['skipped']) - SHOWN_SKIPS} more skipped; "
                   f"see `srdata inspect {db} --json`", err=True)
    st = m["pack_stats"]
    click.echo(f"packed {m['count']:,} images ({len(m['skipped']):,} skipped) into {db}: "
               f"{codec}{f' q{quality} {subsampling}' if codec == 'jpeg' else ''}, "
               f"{_human_bytes(m['bytes'])}, {len(m['shards'])} shard(s), "
               f"{st['seconds']:.1f} s, {st['images_per_s']:,.0f} img/s "
               f"with {st['workers']} worker(s)")


@main.command("inspect")
@click.argument("db", metavar="DB")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect_cmd(db, as_json):
    """Describe the database DB: count, codec, sizes, bytes, skipped files."""
    from .check import describe
    try:
        d = describe(_open(db))
    except fmt.DBError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(d))
        return
    sz = d["sizes"]
    click.echo(f"{d['path']}: {d['count']:,} images, codec {d['codec']}, format "
               f"{d['format']} {d['format_version'] or ''}\n"
               f"  bytes:  {_human_bytes(d['bytes'])} ({_human_bytes(d['bytes_per_image'])} "
               f"per image) in {max(1, len(d['shards']))} shard(s)\n"
               f"  height: {sz['height']['min']}..{sz['height']['max']} "
               f"(median {sz['height']['median']})\n"
               f"  width:  {sz['width']['min']}..{sz['width']['max']} "
               f"(median {sz['width']['median']})\n"
               f"  params: {json.dumps(d['params'])}\n"
               f"  source: {d['source_root']}\n"
               f"  skipped: {len(d['skipped'])}")
    for s in d["skipped"]:
        click.echo(f"    {s['path']}: {s['reason']}")


@main.command("verify")
@click.argument("db", metavar="DB")
@click.option("--strict", is_flag=True,
              help="Fail on warnings too (a BasicSR meta_info.txt shape that differs from "
                   "the stored image).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def verify_cmd(db, strict, quiet):
    """Decode every record of DB and check its checksum and shape."""
    from .check import verify, warnings
    d = _open(db)
    problems, notes = verify(d, progress=not quiet), warnings(d)
    for p in problems:
        click.echo(f"BAD {p}", err=True)
    for w in notes:
        click.echo(f"WARNING {w}", err=True)
    if problems or (strict and notes):
        what = f"{len(problems)} problem(s)" + (f" and {len(notes)} warning(s)" if notes else "")
        raise click.ClickException(f"{db}: {what} in {len(d):,} records; "
                                   + ("pack the database again from its source" if problems
                                      else "without --strict these are warnings only"))
    click.echo(f"{db}: all {len(d):,} records OK"
               + (f", {len(notes)} warning(s)" if notes else ""))


@main.command("warm")
@click.argument("db", metavar="DB")
@click.option("--evict", is_flag=True,
              help="Drop DB from the page cache instead (to measure a cold start).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def warm_cmd(db, evict, quiet):
    """Read DB once so the first training epoch finds it in memory (the page cache)."""
    from . import warm
    d = _open(db)
    try:
        if evict:
            click.echo(f"{db}: asked the kernel to drop {_human_bytes(warm.evict(d))} from "
                       "the page cache")
            return
        r = warm.warm(d, progress=not quiet)
    except OSError as e:  # a shard missing or unreadable
        raise click.ClickException(f"cannot read {e.filename or db}: {e.strerror or e}; "
                                   f"`srdata verify {db}` lists what is damaged") from None
    click.echo(f"{db}: read {_human_bytes(r['bytes'])} in {r['seconds']:.1f} s "
               f"({r['gib_per_s']:.2f} GiB/s)")
    free = warm.available_memory()
    if free is not None and r["bytes"] > free:
        click.echo(f"note: {db} is larger than the {_human_bytes(free)} of available memory; "
                   "the page cache cannot hold all of it, so reads will still hit the disk",
                   err=True)


@main.command("make-samples")
@click.argument("dest", metavar="DEST", type=click.Path(file_okay=False))
@click.option("--count", default=64, type=click.IntRange(min=1), help="How many images.")
@click.option("--seed", default=0, help="Same seed, same images.")
def make_samples_cmd(dest, count, seed):
    """Write COUNT synthetic photo-like images (JPEG and PNG, 320-768 px) under DEST, as
    new files only."""
    from .samples import make_folder
    try:
        paths = make_folder(dest, count, seed=seed)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # a folder that cannot be made, a full disk
        raise click.ClickException(f"cannot write the images under {dest}: {e}") from None
    click.echo(f"wrote {len(paths)} images under {dest}")


if __name__ == "__main__":
    main()
