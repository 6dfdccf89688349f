"""Image I/O and conversion: load anything into canonical RGB arrays, letterbox, PNG, hashing.

The canonical in-memory image of the project is a numpy array of shape `(H, W, 3)`, dtype
`uint8`, channels **RGB** (not OpenCV's BGR). `load_image` turns every supported input
(path, bytes, PIL image, numpy array) into that form and raises `ImageError` - one error
type, with a message naming the problem - for anything else. Choices, fixed here:

- **Transparency** is composited onto **white** `(255, 255, 255)` by default (what viewers
  and browsers show for a transparent PNG; a logo on a transparent background stays legible).
  Pass `background=` to choose another colour.
- **16-bit** data is scaled to 8 bit (`round(v / 257)`, so 65535 -> 255).
- **Floats** must lie in `[0, 1]` and are scaled by 255 and rounded.
- **Multi-frame** files (GIF, APNG, TIFF) give their first frame.
- **EXIF orientation** is applied, so photos come out the way viewers show them.
- **Size limit**: at most `max_pixels` pixels (default `DEFAULT_MAX_PIXELS`), checked from the
  file header *before* decoding, which is the decompression-bomb guard.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from PIL import Image, ImageOps

from lavida_agent.tools.boxes import LetterboxParams, letterbox_params

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 4096 * 4096  # ~16.8 MP: any real photo; refuses decompression bombs
WHITE = (255, 255, 255)

Interpolation = Literal["area", "linear", "cubic", "lanczos", "nearest"]
_INTERPOLATIONS: dict[str, int] = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
    "nearest": cv2.INTER_NEAREST,
}

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageError",
    "check_image_path",
    "content_hash",
    "decode_png",
    "encode_png",
    "from_bgr",
    "from_pil",
    "letterbox",
    "load_image",
    "resize_nearest",
    "save_image",
    "to_bgr",
    "to_pil",
]


class ImageError(ValueError):
    """An input is not a usable image (unknown format, corrupt, empty, too large, bad dtype...)."""


# -- validation helpers -------------------------------------------------------------------


def _check_rgb(image: Any, what: str = "image") -> np.ndarray:
    """Return `image` if it is a canonical `(H, W, 3)` uint8 array, else raise `ImageError`."""
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{what} must be an (H, W, 3) uint8 array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"{what} must have shape (H, W, 3), got {image.shape}")
    if image.dtype != np.uint8:
        raise ImageError(f"{what} must have dtype uint8, got {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"{what} is empty (shape {image.shape})")
    return image


def _check_size(width: int, height: int, max_pixels: int) -> None:
    """Raise `ImageError` for a zero-size image or one with more than `max_pixels` pixels."""
    if width <= 0 or height <= 0:
        raise ImageError(f"image has zero size ({width} x {height})")
    if width * height > max_pixels:
        raise ImageError(
            f"image is too large: {width} x {height} = {width * height} pixels "
            f"(limit {max_pixels})"
        )


def _check_color(name: str, color: Any) -> tuple[int, int, int]:
    """Validate an RGB triple of ints in 0..255."""
    try:
        values = tuple(int(v) for v in color)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an (r, g, b) triple, got {color!r}") from None
    if len(values) != 3 or any(not 0 <= v <= 255 for v in values):
        raise ValueError(f"{name} must be an (r, g, b) triple of 0..255, got {color!r}")
    return values  # type: ignore[return-value]


def _composite(rgb: np.ndarray, alpha: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Blend `rgb` (H, W, 3) uint8 over a solid `background` using `alpha` (H, W) uint8."""
    a = alpha.astype(np.uint32)[..., None]  # (H, W, 1)
    bg = np.asarray(background, dtype=np.uint32)  # (3,)
    # Integer blend with rounding: (c * a + bg * (255 - a) + 127) // 255, exact at a = 0, 255.
    out = (rgb.astype(np.uint32) * a + bg * (255 - a) + 127) // 255
    return out.astype(np.uint8)


# -- numpy --------------------------------------------------------------------------------


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Convert the sample values of `array` to uint8 (see the module docstring for the rules)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError("float image contains NaN or infinity")
        lo, hi = float(array.min()), float(array.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageError(
                f"float image values must lie in [0, 1], got min {lo:g}, max {hi:g} "
                "(convert 0..255 data to uint8 first)"
            )
        return np.floor(array.astype(np.float64) * 255.0 + 0.5).astype(np.uint8)
    raise ImageError(
        f"unsupported dtype {array.dtype}: use uint8, uint16, or float in [0, 1]"
    )


def _from_array(
    array: np.ndarray, max_pixels: int, background: tuple[int, int, int]
) -> np.ndarray:
    """Canonicalise an HxW, HxWx1, HxWx3 or HxWx4 array (RGB/RGBA order) to a new RGB array."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageError(
            f"array must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}"
        )
    h, w = array.shape[:2]
    _check_size(w, h, max_pixels)
    data = _to_uint8(array)
    c = data.shape[2]
    if c == 1:
        rgb = np.repeat(data, 3, axis=2)
    elif c == 3:
        rgb = data
    else:
        rgb = _composite(data[..., :3], data[..., 3], background)
    # Always hand back a new, C-contiguous array: callers may mutate it freely.
    return np.array(rgb, dtype=np.uint8, order="C", copy=True)


# -- PIL ----------------------------------------------------------------------------------


def from_pil(
    img: Image.Image,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = WHITE,
) -> np.ndarray:
    """Convert a PIL image of any mode to a canonical `(H, W, 3)` uint8 RGB array.

    Raises:
        ImageError: zero-size or too many pixels, or a mode that cannot become RGB.
    """
    if not isinstance(img, Image.Image):
        raise ImageError(f"expected a PIL image, got {type(img).__name__}")
    _check_size(img.width, img.height, max_pixels)
    mode = img.mode
    try:
        if mode.startswith("I;16") or mode == "I":
            # 16-bit grey (PNG/TIFF). Mode "I" is 32-bit; treat it as 8-bit when it fits,
            # else as 16-bit (how Pillow reports 16-bit data from some formats).
            data = np.asarray(img).astype(np.int64)
            if mode == "I" and data.size and data.max() <= 255 and data.min() >= 0:
                data8 = data.astype(np.uint8)
            else:
                data8 = _to_uint8(np.clip(data, 0, 65535).astype(np.uint16))
            return _from_array(data8, max_pixels, background)
        if mode == "F":
            return _from_array(np.asarray(img), max_pixels, background)
        # Alpha channels, and palette / grey / RGB images with a transparent colour (tRNS).
        if img.has_transparency_data:
            rgba = np.asarray(img.convert("RGBA"))
            return _composite(rgba[..., :3], rgba[..., 3], background)
        if mode == "RGB":
            return np.array(img, dtype=np.uint8)
        if mode in ("1", "L"):
            return _from_array(np.asarray(img.convert("L")), max_pixels, background)
        return np.array(img.convert("RGB"), dtype=np.uint8)
    except ImageError:
        raise
    except Exception as exc:  # Pillow raises many types for odd modes; report one.
        raise ImageError(f"cannot convert PIL image of mode {mode!r} to RGB: {exc}") from exc


def to_pil(image: np.ndarray) -> Image.Image:
    """Wrap a canonical `(H, W, 3)` uint8 RGB array as a PIL RGB image (copied)."""
    return Image.fromarray(np.ascontiguousarray(_check_rgb(image)))


def to_bgr(image: np.ndarray) -> np.ndarray:
    """Return a BGR copy of a canonical RGB image, for OpenCV functions that expect BGR."""
    return np.ascontiguousarray(_check_rgb(image)[..., ::-1])


def from_bgr(image: np.ndarray) -> np.ndarray:
    """Return an RGB copy of an OpenCV BGR `(H, W, 3)` uint8 image."""
    return np.ascontiguousarray(_check_rgb(image)[..., ::-1])


# -- decoding -----------------------------------------------------------------------------


def _decode(
    fp: Any,
    what: str,
    max_pixels: int,
    background: tuple[int, int, int],
    formats: list[str] | None = None,
) -> np.ndarray:
    """Open `fp` (path or file object) with Pillow, check the header size, then decode."""
    try:
        # Image.open reads only the header: the size is known before any pixel is decoded.
        img = Image.open(fp, formats=formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (its limit is above ours; the warning is an exception only when
        # warnings are turned into errors). Either way: too large.
        raise ImageError(f"{what}: image is too large ({exc})") from exc
    except Image.UnidentifiedImageError as exc:  # its message holds the file object's repr
        kind = " as PNG" if formats == ["PNG"] else ""
        raise ImageError(f"{what}: not a recognised image{kind} (Pillow cannot identify it)") from exc
    except Exception as exc:  # OSError, SyntaxError, ...
        kind = " as PNG" if formats == ["PNG"] else ""
        raise ImageError(f"{what}: not a recognised image{kind} ({exc})") from exc
    with img:
        _check_size(img.width, img.height, max_pixels)
        try:
            img.seek(0)  # first frame of animations
            img.load()
            oriented = ImageOps.exif_transpose(img)
        except Exception as exc:  # truncated / corrupt data surfaces only while decoding
            raise ImageError(f"{what}: corrupt or truncated image data ({exc})") from exc
        return from_pil(oriented, max_pixels=max_pixels, background=background)


def load_image(
    src: str | Path | bytes | bytearray | memoryview | Image.Image | np.ndarray,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = WHITE,
) -> np.ndarray:
    """Load any supported image into a new canonical `(H, W, 3)` uint8 RGB array.

    Args:
        src: a file path (`str` or `Path`); encoded file bytes (PNG, JPEG, GIF, BMP, WebP,
            TIFF, ... whatever Pillow reads); a PIL image of any mode; or a numpy array of
            shape `(H, W)`, `(H, W, 1)`, `(H, W, 3)` or `(H, W, 4)` in RGB(A) order with dtype
            uint8, uint16, or float in `[0, 1]`.
        max_pixels: refuse images with more pixels than this (checked before decoding).
        background: RGB colour that transparent pixels are composited onto.

    Returns:
        `np.ndarray` of shape `(H, W, 3)`, dtype uint8, RGB; never a view of `src`.

    Raises:
        ImageError: the input is missing, empty, of an unsupported type, unreadable, corrupt,
            zero-size, larger than `max_pixels`, or has an unsupported shape or dtype.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    bg = _check_color("background", background)
    if isinstance(src, np.ndarray):
        return _from_array(src, max_pixels, bg)
    if isinstance(src, Image.Image):
        return from_pil(src, max_pixels=max_pixels, background=bg)
    if isinstance(src, bytes | bytearray | memoryview):
        data = bytes(src)
        if not data:
            raise ImageError("image bytes are empty")
        return _decode(io.BytesIO(data), f"{len(data)} bytes", max_pixels, bg)
    if isinstance(src, str | Path):
        path = Path(src)
        if not path.is_file():
            raise ImageError(f"no such image file: {str(path)!r}")
        if path.stat().st_size == 0:
            raise ImageError(f"image file is empty: {str(path)!r}")
        return _decode(path, repr(str(path)), max_pixels, bg)
    raise ImageError(
        f"cannot load an image from {type(src).__name__}: "
        "expected a path, bytes, a PIL image or a numpy array"
    )


# -- geometry -----------------------------------------------------------------------------


def letterbox(
    image: Any,
    size: int = 64,
    fill: tuple[int, int, int] = (0, 0, 0),
    interpolation: Interpolation = "area",
) -> tuple[np.ndarray, LetterboxParams]:
    """Resize the longer side to `size` (keeping the aspect ratio) and pad to a square.

    Boxes follow with `boxes.to_letterbox(box, params)` / `boxes.from_letterbox(box, params)`.

    Args:
        image: anything `load_image` accepts (a canonical array is used as is, not copied twice).
        size: side of the output square in pixels.
        fill: RGB colour of the padding.
        interpolation: `"area"` (default; best for shrinking), `"linear"`, `"cubic"`,
            `"lanczos"` or `"nearest"`.

    Returns:
        `(square, params)`: a `(size, size, 3)` uint8 RGB array and the `LetterboxParams`.

    Raises:
        ImageError: the image cannot be loaded.
        ValueError: bad `size`, `fill` or `interpolation`.
    """
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(
            f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}"
        )
    color = _check_color("fill", fill)
    rgb = image if _is_canonical(image) else load_image(image)
    h, w = rgb.shape[:2]
    params = letterbox_params(w, h, size)
    cw, ch = params.content_size(w, h)
    if (cw, ch) == (w, h):
        content = rgb
    else:
        content = cv2.resize(rgb, (cw, ch), interpolation=_INTERPOLATIONS[interpolation])
    out = np.empty((params.size, params.size, 3), dtype=np.uint8)
    out[...] = color
    out[params.pad_y : params.pad_y + ch, params.pad_x : params.pad_x + cw] = content
    return out, params


def _is_canonical(image: Any) -> bool:
    """True for a non-empty `(H, W, 3)` uint8 ndarray."""
    return (
        isinstance(image, np.ndarray)
        and image.dtype == np.uint8
        and image.ndim == 3
        and image.shape[2] == 3
        and image.size > 0
    )


MAX_UPSCALED_SIDE = 8192  # px: `resize_nearest`'s largest output side


def resize_nearest(image: np.ndarray, scale: int) -> np.ndarray:
    """Upscale by an integer factor, repeating each pixel `scale` x `scale` times.

    Nearest-neighbour keeps the pixels honest: a 64 px render previewed at 512 px shows exactly
    the model's pixels, with no smoothing invented by the resampler.

    Args:
        image: `(H, W)` or `(H, W, C)` array of any dtype.
        scale: integer factor >= 1.

    Returns:
        A new array of shape `(H * scale, W * scale[, C])`.

    Raises:
        ValueError: `scale` is not an integer >= 1, or makes a side longer than
            `MAX_UPSCALED_SIDE` px (a typo such as 1000 would take every byte of memory).
    """
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3):
        raise ImageError(f"image must be an (H, W) or (H, W, C) array, got {_describe(image)}")
    if isinstance(scale, bool) or not isinstance(scale, int | np.integer) or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    h, w = image.shape[:2]
    if max(h, w) * scale > MAX_UPSCALED_SIDE:
        raise ValueError(f"scale {scale} would make the {w}x{h} image {w * scale}x{h * scale}: at most "
                         f"{MAX_UPSCALED_SIDE} px a side (scale <= {max(1, MAX_UPSCALED_SIDE // max(h, w))})")  # fmt: skip
    return np.repeat(np.repeat(image, int(scale), axis=0), int(scale), axis=1)


def _describe(obj: Any) -> str:
    """Short description of an object for error messages."""
    if isinstance(obj, np.ndarray):
        return f"array of shape {obj.shape} and dtype {obj.dtype}"
    return type(obj).__name__


# -- encoding and hashing -----------------------------------------------------------------


def encode_png(image: np.ndarray) -> bytes:
    """Encode a canonical `(H, W, 3)` uint8 RGB array as PNG bytes (lossless)."""
    rgb = _check_rgb(image)
    # OpenCV's encoder is several times faster than Pillow's; it wants BGR.
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:  # pragma: no cover - OpenCV only fails on invalid input, checked above
        raise ImageError(f"OpenCV failed to encode an image of shape {rgb.shape} as PNG")
    return buf.tobytes()


def decode_png(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode PNG bytes into a canonical `(H, W, 3)` uint8 RGB array.

    Raises:
        ImageError: empty data, not a PNG, corrupt, or more than `max_pixels` pixels.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ImageError(f"PNG data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ImageError("PNG bytes are empty")
    if not data.startswith(_PNG_SIGNATURE):
        raise ImageError(f"{len(data)} bytes: not a PNG (bad signature {data[:8]!r})")
    return _decode(io.BytesIO(data), f"{len(data)} PNG bytes", max_pixels, WHITE, ["PNG"])


def content_hash(image: np.ndarray) -> str:
    """Return the sha256 hex digest identifying an image's pixels.

    The digest covers a canonical encoding, not a file: the ASCII header `"rgb8:{H}x{W}\\n"`
    followed by the raw C-order RGB bytes. It is deterministic across machines and library
    versions (a PNG encoder's output is not) and costs one pass over the pixels. Two images
    hash equal exactly when their shape and every pixel are equal. The artifact store names
    files by this digest, so it is *not* the sha256 of the stored `.png` file.
    """
    rgb = _check_rgb(image)
    h, w = rgb.shape[:2]
    digest = hashlib.sha256(f"rgb8:{h}x{w}\n".encode("ascii"))
    digest.update(np.ascontiguousarray(rgb).data)
    return digest.hexdigest()


def check_image_path(path: str | Path) -> Path:
    """`path` as a `Path` if its suffix names a format Pillow can write (`.png`, `.jpg`,
    ...), else raise `ImageError`: a caller checks where an image will go before the work
    that makes it."""
    out = Path(path)
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ImageError(f"cannot save an image to {str(out)!r}: unknown file extension "
                         f"{out.suffix or '(none)'!r}; use .png, .jpg, .webp, .bmp, ...")  # fmt: skip
    return out


def save_image(image: np.ndarray, path: str | Path) -> Path:
    """Write a canonical RGB array to `path`; the suffix picks the format (`.png`, `.jpg`, ...).

    Not atomic; use `ArtifactStore` for durable storage.

    Returns:
        The path written, as a `Path`.
    """
    out = Path(path)
    try:
        to_pil(image).save(out)
    except (KeyError, ValueError) as exc:  # Pillow: unknown extension
        raise ImageError(f"cannot save image to {str(out)!r}: {exc}") from exc
    return out

