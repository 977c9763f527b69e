"""README.md and docs/ say what runs: their runnable blocks run, their links resolve, their
included examples are the files.

A fenced block whose info string is ``sh runnable`` (or ``python runnable``) runs, in order
with the page's other runnable blocks, in a fresh folder holding what a reader has: a few
photos in ``photos/``, one ``photo.jpg``, and the checkout's ``examples/`` and ``tools/``.
At toy size: srtrain's own variables BATCH_SIZE=2, TARGET_SIZE=32 and NUM_EPOCHS=1 stand in
for options a command leaves out, and a training run that names no ``--model`` trains
``srcnn`` (a ``--resume`` keeps its run's model). ``python file=PATH`` blocks must be PATH's
text, which the runnable blocks then run.
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, make_images

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RESULT_NOTES = sorted((ROOT / "benchmarks" / "results").glob("*/notes.md"))
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")
# what the product's pages never speak of: how it was developed and measured, not what it is
NOT_PRODUCT = re.compile(r"device[- ]minutes?|\blent\b|the bundle|device tool|"
                         r"other developers|\bsessions?\b(?!/)|goals met|not met yet", re.I)
SUBCOMMANDS = ("upscale", "export", "demo")


def blocks(page: Path) -> list[tuple[list[str], str]]:
    """Each fenced block of ``page``: (its info string's words, its text)."""
    return [(info.split(), text) for info, text in FENCE.findall(page.read_text())]


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives ``page``'s headings: lower case, punctuation dropped, spaces
    to hyphens."""
    heads = re.findall(r"^#+\s+(.*)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def runnable(page: Path) -> list[tuple[str, str]]:
    return [(words[0], text) for words, text in blocks(page)
            if len(words) > 1 and "runnable" in words[1:]]


def srtrain_shim(bin_dir: Path) -> None:
    """``srtrain``, ``srdata`` and ``python`` on PATH: this checkout's, with ``--model srcnn``
    added to a training run that names no model (a sub-command, --help or --resume runs as
    written)."""
    script = f"""#!/bin/sh
toy=1
for a in "$@"; do
  case "$a" in --model|--model=*|--resume|-h|--help|--version) toy=0 ;; esac
done
case "${{1:-}}" in {'|'.join(SUBCOMMANDS)}) toy=0 ;; esac
[ $toy = 1 ] && set -- "$@" --model srcnn
exec {shlex.quote(sys.executable)} -m srtrain "$@"
"""
    (bin_dir / "srtrain").write_text(script)
    (bin_dir / "srdata").write_text(
        f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c "
        "'import sys; from srdata.cli import main; sys.argv[0] = \"srdata\"; main()' \"$@\"\n")
    for name in ("python", "python3"):  # a script: a link would lose the venv's packages
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    for name in ("srtrain", "srdata", "python", "python3"):
        (bin_dir / name).chmod(0o755)


@pytest.fixture
def reader(tmp_path):
    """A folder as a reader's, and the environment the pages' commands run in."""
    work, bin_dir = tmp_path / "work", tmp_path / "bin"
    work.mkdir(), bin_dir.mkdir()
    make_images(work / "photos", [(256, 288), (288, 256), (260, 300), (300, 264)] * 3,
                exts=(".jpg", ".png"))
    make_images(tmp_path / "one", [(96, 128)], exts=(".jpg",))
    next((tmp_path / "one").rglob("*.jpg")).rename(work / "photo.jpg")
    for name in ("examples", "tools"):
        (work / name).symlink_to(ROOT / name)
    srtrain_shim(bin_dir)
    env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                        "PYTHONPATH": str(ROOT), "BATCH_SIZE": "2", "TARGET_SIZE": "32",
                        "NUM_EPOCHS": "1"}
    return work, env


@pytest.mark.parametrize("page", [p for p in PAGES if runnable(p)],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
@pytest.mark.dali
def test_runnable_blocks_run(page, reader):
    pytest.importorskip("nvidia.dali")  # the pages' commands use srtrain's default loader
    work, env = reader
    for i, (lang, text) in enumerate(runnable(page)):
        if lang == "python":
            (work / f"block{i}.py").write_text(text)
            cmd = [sys.executable, f"block{i}.py"]
        else:
            assert lang == "sh", f"{page.name}: a runnable block in {lang!r}, expected sh or python"
            cmd = ["bash", "-euo", "pipefail", "-c", text]
        r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, (f"{page.name}, runnable block {i + 1} failed "
                                   f"(exit {r.returncode}):\n{text}\n{r.stdout}\n{r.stderr}")


def test_included_examples_are_the_files():
    included = 0
    for page in PAGES:
        for words, text in blocks(page):
            for w in words[1:]:
                if w.startswith("file="):
                    path = ROOT / w[len("file="):]
                    assert path.is_file(), f"{page.name} includes {path}, which is missing"
                    assert text == path.read_text(), f"{page.name}'s copy of {path.name} differs"
                    included += 1
    assert included >= 2


@pytest.mark.parametrize("page", PAGES + RESULT_NOTES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve()
        assert path.exists(), f"{page.relative_to(ROOT)} links to {target}, which is missing"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), (f"{page.relative_to(ROOT)} links to {target}: "
                                             "no such heading")


@pytest.mark.parametrize("page", PAGES + RESULT_NOTES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_speak_of_the_product(page):
    text = re.sub(r"gpu[_-]session\.(sh|tar\.gz)", "", page.read_text())  # file names
    found = sorted({m.group(0) for m in NOT_PRODUCT.finditer(text)})
    assert not found, f"{page.relative_to(ROOT)} speaks of {found}"


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"
