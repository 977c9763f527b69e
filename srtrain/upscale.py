"""Apply a trained super-resolution model to an image file or a folder of them.

The image is processed in tiles because the activations of a model like RRDBNet grow with
the pixel count times its width: a whole 4K photo does not fit in GPU memory, a 256 px tile
does. Cutting the input naively leaves seams, since pixels near a tile's edge see zero
padding instead of their real neighbours. So each tile is cut with an ``overlap`` margin of
real context on every side and only its centre is kept: when the margin covers the model's
receptive field, the tiled result equals the whole-image one.

``tile`` is the largest input (margins included) the model sees at once, so it bounds the
memory; each tile contributes its central ``tile - 2 * overlap`` pixels. For x2 models the
image is padded to even sizes and cuts snap to a 2 px grid (up to 1 px more per side),
because x2 RRDBNets pixel-unshuffle their input.

Alpha is kept: the model sees the RGB (as OpenCV decodes it, colour values unchanged under
transparent pixels), the alpha channel is upscaled bicubically, and the result is written
as RGBA (folders always give .png). Grey images are upscaled as RGB (grey in all three
channels) and written as 3-channel RGB; 16-bit images as 8-bit.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from srdata.format import atomic_file
from srdata.images import has_alpha

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# The largest input upscaled unless asked (--max-pixels): 4096 x 4096. A 100 KB PNG can
# declare 6000 x 6000 pixels, which a CPU upscales for many minutes into gigabytes.
MAX_PIXELS = 4096 * 4096


def _check_tiling(tile: int, overlap: int) -> None:
    if overlap < 0:
        raise ValueError(f"got overlap={overlap}, expected >= 0")
    if tile < 0 or 0 < tile <= 2 * overlap:
        raise ValueError(f"got tile={tile}, expected 0 or > 2*overlap (overlap={overlap})")


def _use_half(half: bool | None, device: torch.device) -> bool:
    # fp16 roughly halves time and memory on CUDA; CPU fp16 kernels are slow, so fp32 there
    return device.type == "cuda" if half is None else bool(half)


def _spans(size: int, core: int, overlap: int, m: int) -> list[tuple[int, int, int, int]]:
    """(start, stop) of each core piece of ``size`` and (start, stop) of the input cut for it:
    the core widened by ``overlap``, clipped at the border (where the model then pads as it
    would untiled) and aligned to multiples of ``m``."""
    core = core or size
    pieces = []
    for a in range(0, size, core):
        b = min(a + core, size)
        ca, cb = max(a - overlap, 0) // m * m, min(-(-(b + overlap) // m) * m, size)
        pieces.append((a, b, ca, cb))
    return pieces


def _run_tile(model, lr: torch.Tensor, scale: int, half: bool) -> torch.Tensor:
    x = (lr.float() / 255).permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
    with torch.autocast(lr.device.type, dtype=torch.float16, enabled=half):
        y = model(x)
    h, w = lr.shape[:2]
    if tuple(y.shape[-3:]) != (3, h * scale, w * scale):
        raise ValueError(f"the model maps a {h}x{w} input to {tuple(y.shape)}, expected "
                         f"(1, 3, {h * scale}, {w * scale}) for its scale={scale}")
    # rounding per tile equals rounding the whole image: the conversion is elementwise
    return (y[0].float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)


def upscale_image(model, rgb: np.ndarray, tile: int = 256, overlap: int = 16,
                  device: str | torch.device = "cpu", half: bool | None = None) -> np.ndarray:
    """``model`` applied to an HxWx3 uint8 RGB image: an (H*scale)x(W*scale)x3 uint8 image.

    ``tile`` 0 runs the whole image at once. ``half`` None means fp16 autocast on CUDA and
    fp32 on the CPU. The model is moved to ``device``; its train/eval mode is restored.
    """
    _check_tiling(tile, overlap)
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3
            and rgb.shape[2] == 3):
        raise ValueError(f"expected an HxWx3 uint8 RGB array, got "
                         f"{getattr(rgb, 'dtype', type(rgb))} {getattr(rgb, 'shape', '')}")
    scale = getattr(model, "scale", None)
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"the model needs an integer attribute scale >= 1, got {scale!r}")
    device = torch.device(device)
    half = _use_half(half, device)
    h, w = rgb.shape[:2]
    # x2 RRDBNets pixel-unshuffle by 2: they need even sizes, and cuts on the same 2 px grid
    # as the whole image, else each tile would group its pixels differently
    m = 2 if scale == 2 else 1
    img = np.pad(rgb, ((0, -h % m), (0, -w % m), (0, 0)), mode="edge")
    hp, wp = img.shape[:2]
    out = np.empty((hp * scale, wp * scale, 3), np.uint8)  # on the host: the GPU holds a tile
    core = tile - 2 * overlap if tile else 0
    was_training = model.training
    model.to(device, memory_format=torch.channels_last).eval()
    try:
        with torch.inference_mode():
            for y0, y1, cy0, cy1 in _spans(hp, core, overlap, m):
                for x0, x1, cx0, cx1 in _spans(wp, core, overlap, m):
                    sr = _run_tile(model, torch.from_numpy(img[cy0:cy1, cx0:cx1]).to(device),
                                   scale, half)
                    oy, ox = (y0 - cy0) * scale, (x0 - cx0) * scale
                    out[y0 * scale:y1 * scale, x0 * scale:x1 * scale] = sr[
                        oy:oy + (y1 - y0) * scale, ox:ox + (x1 - x0) * scale].cpu().numpy()
    finally:
        model.train(was_training)
    return out if (hp, wp) == (h, w) else np.ascontiguousarray(out[:h * scale, :w * scale])


def read_rgb(path: Path) -> np.ndarray | None:
    """The image as HxWx3 uint8 RGB, or None when it cannot be read or decoded."""
    try:
        buf = np.fromfile(path, np.uint8)  # not cv2.imread: it fails on non-ASCII names
        # IMREAD_COLOR turns grey, alpha and 16-bit images into 8-bit BGR
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    except (OSError, cv2.error):
        return None
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# formats whose files may carry an alpha channel (and that we write with one)
ALPHA_EXTS = (".png", ".webp", ".tif", ".tiff")


def declared_pixels(path: Path) -> int | None:
    """Width x height as the image file's header declares it (nothing is decoded); None
    when Pillow cannot tell. Above Pillow's own bomb limit, that limit (a lower bound)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.width * im.height
    except Image.DecompressionBombError:
        return 2 * Image.MAX_IMAGE_PIXELS + 1
    except (OSError, ValueError, SyntaxError, EOFError):
        return None


def too_large(pixels: int | None, max_pixels: int) -> str | None:
    """Why an image of ``pixels`` is not upscaled under ``max_pixels`` (0: no limit); None
    when it is."""
    if not max_pixels or pixels is None or pixels <= max_pixels:
        return None
    return (f"{pixels:,} pixels, more than --max-pixels {max_pixels:,} (a small file can "
            f"declare a huge image); pass --max-pixels {pixels} to upscale it anyway")


def read_image(path: Path) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(HxWx3 uint8 RGB, HxW uint8 alpha or None when it has none), upright; None when the
    file cannot be read or decoded."""
    if path.suffix.lower() in ALPHA_EXTS:  # JPEG and BMP carry no alpha: no Pillow for them
        rgba = _read_rgba(path)
        if rgba is not None:
            return rgba
    rgb = read_rgb(path)
    return None if rgb is None else (rgb, None)


def _read_rgba(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """Colour and alpha of an image with transparency from one decode, turned upright by
    its EXIF orientation together; None for any other image (read_rgb reads it). Not
    OpenCV: its IMREAD_UNCHANGED, the one way it gives alpha, ignores the EXIF orientation
    that IMREAD_COLOR applies, so the alpha came out turned against the colour."""
    try:
        with Image.open(path) as im:
            # 16-bit and float grey: Pillow clips instead of keeping the top byte, and
            # OpenCV gives them no alpha either
            if not has_alpha(im) or im.mode.startswith(("I", "F")):
                return None
            im.load()
            rgba = np.asarray(ImageOps.exif_transpose(im).convert("RGBA"))
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None  # read_rgb says whether it can be read at all
    return np.ascontiguousarray(rgba[:, :, :3]), np.ascontiguousarray(rgba[:, :, 3])


def upscale_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    """The alpha channel upscaled bicubically: it is a mask, not a photo, for the model."""
    h, w = alpha.shape
    return cv2.resize(alpha, (w * scale, h * scale), interpolation=cv2.INTER_CUBIC)


def write_rgb(path: Path, rgb: np.ndarray) -> None:
    """Encode by extension and write atomically: a crash never leaves a truncated image.
    An HxWx4 array is written as RGBA."""
    code = cv2.COLOR_RGBA2BGRA if rgb.shape[2] == 4 else cv2.COLOR_RGB2BGR
    ok, buf = cv2.imencode(path.suffix.lower(), cv2.cvtColor(rgb, code))
    if not ok:
        raise ValueError(f"OpenCV could not encode {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb") as f:
        f.write(buf.tobytes())


def _plan_folder(src: Path, dst: Path) -> tuple[list[tuple[Path, Path]], list[dict]]:
    """(source, output) pairs for the images under ``src``, and the ones that must be skipped."""
    if dst.resolve() == src.resolve():
        raise ValueError(f"the output folder {dst} is the input folder; choose another")
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"the input {src} is a folder but the output {dst} is a file")
    inside = dst.resolve()
    # only when OUTPUT lies inside INPUT can the walk meet earlier outputs; when INPUT lies
    # inside OUTPUT every input has OUTPUT above it, and none of them may be skipped
    dst_in_src = src.resolve() in inside.parents
    pairs, skipped, taken, inputs, outputs = [], [], {}, {}, 0
    for p in sorted(src.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in IMAGE_EXTS:
            continue
        if dst_in_src and inside in p.resolve().parents:
            outputs += 1  # outputs of an earlier run
            continue
        inputs[_identity(p)] = p
        out = dst / p.relative_to(src).with_suffix(".png")
        if out in taken:  # a.jpg and a.png would both become a.png
            skipped.append({"path": str(p), "reason": f"{out} already comes from {taken[out]}"})
            continue
        taken[out] = p
        pairs.append((p, out))
    if not pairs:
        raise ValueError(_nothing_to_do(src, dst, outputs))
    _check_inputs_kept(pairs, inputs)
    return pairs, skipped


def _nothing_to_do(src: Path, dst: Path, outputs: int) -> str:
    if outputs:
        return (f"the only images under {src} are the {outputs} in the output folder {dst}; "
                "put the images to upscale outside it")
    return (f"no images under {src} (looked for {', '.join(IMAGE_EXTS)}); "
            "give a folder of images or an image file")


def _identity(path: Path) -> tuple[int, int] | None:
    """The file ``path`` names, however spelled or linked (symlink, hard link, ``..``); None
    when there is none."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _check_inputs_kept(pairs: list[tuple[Path, Path]], inputs: dict) -> None:
    """With INPUT inside OUTPUT, in/x/a.png becomes x/a.png, which may be an input itself:
    never write over an input, --overwrite or not. ``inputs``: _identity -> input."""
    for p, out in pairs:
        same = inputs.get(_identity(out)) if out.exists() else None
        if same is not None:
            raise ValueError(f"the output {out} of {p} would replace the input "
                             f"{same}; choose another OUTPUT folder")


def _check_protected(pairs: list[tuple[Path, Path]], protect) -> None:
    """Never write over a file of ``protect`` (the model's checkpoint) or any other srtrain
    checkpoint, --overwrite or not."""
    from .checkpoint import keep_checkpoints
    for _, out in pairs:
        keep_checkpoints(out, protect, "upscale")


def _check_existing(pairs: list[tuple[Path, Path]], dst: Path, folder: bool) -> None:
    """Refuse, before anything is written, to replace a file that is already there: it may be
    a user's original, not an earlier output."""
    existing = [out for _, out in pairs if out.exists()]
    if not existing:
        return
    if not folder:
        raise ValueError(f"{existing[0]} already exists; pass --overwrite to replace it, "
                         "or choose another OUTPUT")
    raise ValueError(f"{len(existing)} of the {len(pairs)} outputs already exist in {dst} "
                     f"(such as {existing[0]}); pass --overwrite to replace them, or choose "
                     "another OUTPUT folder")


def _plan_file(src: Path, dst: Path) -> list[tuple[Path, Path]]:
    if not cv2.haveImageWriter(str(dst)):
        raise ValueError(f"OpenCV cannot write the output extension {dst.suffix!r} of {dst}; "
                         "use .png, .jpg, .bmp, .tif or .webp")
    if dst.resolve() == src.resolve() or (dst.exists() and _identity(dst) == _identity(src)):
        raise ValueError(f"the output {dst} is the input file; choose another name")
    if dst.is_dir():
        raise ValueError(f"the input {src} is a file but the output {dst} is a folder")
    return [(src, dst)]


def upscale_path(model, src, dst, tile: int = 256, overlap: int = 16,
                 device: str | torch.device = "cpu", half: bool | None = None,
                 progress: bool = True, overwrite: bool = False,
                 max_pixels: int = MAX_PIXELS, protect=()) -> dict:
    """Upscale the image file ``src`` into the file ``dst``, or every image under the folder
    ``src`` into ``dst/<relative path>/<stem>.png``.

    An output that already exists is replaced only with ``overwrite`` (checked for all of
    them before anything is written); an input, a file of ``protect`` or an srtrain
    checkpoint never is. An image of more than ``max_pixels`` (0: no limit) is refused, and
    unreadable ones; in a folder they are skipped with a warning, not fatal. Returns
    ``{"written": [path, ...], "skipped": [{"path", "reason"}, ...], "seconds": float}``.
    """
    _check_tiling(tile, overlap)
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if src.is_dir():
        pairs, skipped = _plan_folder(src, dst)
    elif src.is_file():
        pairs, skipped = _plan_file(src, dst), []
    else:
        raise ValueError(f"the input {src} is neither a file nor a folder")
    _check_protected(pairs, protect)
    if not overwrite:
        _check_existing(pairs, dst, src.is_dir())
    for s in skipped:
        warnings.warn(f"skipping {s['path']}: {s['reason']}", stacklevel=2)
    written = []
    for inp, out in tqdm(pairs, desc="upscale", unit="img", disable=not progress):
        why = too_large(declared_pixels(inp), max_pixels)  # before decoding it
        image = read_image(inp) if why is None else None
        if image is not None:  # a header Pillow cannot read: the decoded size
            why = too_large(image[0].shape[0] * image[0].shape[1], max_pixels)
            image = image if why is None else None
        if image is None:
            if not src.is_dir():
                raise ValueError(f"the image {inp} has {why}" if why else
                                 f"cannot read the image {inp}: missing, corrupt or not an "
                                 "image")
            reason = why or "cannot be read or decoded"
            skipped.append({"path": str(inp), "reason": reason})
            warnings.warn(f"skipping {inp}: {reason}", stacklevel=2)
            continue
        rgb, alpha = image
        sr = upscale_image(model, rgb, tile, overlap, device, half)
        if alpha is not None and out.suffix.lower() in ALPHA_EXTS:
            sr = np.dstack([sr, upscale_alpha(alpha, sr.shape[0] // rgb.shape[0])])
        elif alpha is not None:
            warnings.warn(f"{out}: {out.suffix} has no alpha channel, so the alpha of {inp} "
                          "is dropped; write .png to keep it", stacklevel=2)
        write_rgb(out, sr)
        written.append(str(out))
    return {"written": written, "skipped": skipped, "seconds": time.perf_counter() - start}
