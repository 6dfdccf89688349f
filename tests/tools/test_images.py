"""Tests for tools/images.py: every input kind, every error case, PNG, hashing, letterbox."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra import numpy as hnp
from PIL import Image

from lavida_agent.tools import boxes, images
from lavida_agent.tools.images import ImageError, load_image


@pytest.fixture
def rgb():
    """A 6x5 image with distinct pixels, so transposes and channel swaps show."""
    return np.arange(6 * 5 * 3, dtype=np.uint8).reshape(6, 5, 3) * 2


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _png_with_header_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR claims `width` x `height` (valid CRC): a decompression bomb."""
    data = bytearray(_png_bytes(np.zeros((1, 1, 3), np.uint8)))
    ihdr = 8 + 4  # signature, then chunk length; the chunk type "IHDR" starts here
    assert data[ihdr : ihdr + 4] == b"IHDR"
    body = bytes(data[ihdr + 4 : ihdr + 4 + 13])
    body = struct.pack(">II", width, height) + body[8:]
    data[ihdr + 4 : ihdr + 4 + 13] = body
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(b"IHDR" + body))
    return bytes(data)


# -- numpy inputs -------------------------------------------------------------------------


def test_uint8_rgb_is_copied(rgb):
    out = load_image(rgb)
    assert out.dtype == np.uint8 and out.shape == (6, 5, 3)
    np.testing.assert_array_equal(out, rgb)
    assert not np.shares_memory(out, rgb)
    assert out.flags.c_contiguous


def test_non_contiguous_array(rgb):
    view = rgb[:, ::-1]
    np.testing.assert_array_equal(load_image(view), view)
    assert load_image(view).flags.c_contiguous


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 1)])
def test_gray_array(shape):
    gray = np.arange(30, dtype=np.uint8).reshape(shape)
    out = load_image(gray)
    assert out.shape == (6, 5, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray.reshape(6, 5))


def test_rgba_array_composites_onto_white_by_default():
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, :, :3] = (200, 100, 0)
    rgba[0, :, 3] = (0, 255, 128)
    out = load_image(rgba)
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent -> background
    assert out[0, 1].tolist() == [200, 100, 0]  # opaque -> colour
    expected = [round((c * 128 + 255 * 127) / 255) for c in (200, 100, 0)]
    assert out[0, 2].tolist() == expected
    black = load_image(rgba, background=(0, 0, 0))
    assert black[0, 0].tolist() == [0, 0, 0]


def test_float_array():
    f = np.array([[[0.0, 0.5, 1.0]]], dtype=np.float32)
    assert load_image(f)[0, 0].tolist() == [0, 128, 255]
    assert load_image(np.full((2, 2), 1.0))[0, 0].tolist() == [255, 255, 255]


def test_uint16_array_scales_to_8_bit():
    a = np.array([[0, 257, 65535]], dtype=np.uint16)
    assert load_image(a)[0, :, 0].tolist() == [0, 1, 255]


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((0, 5, 3), np.uint8), "zero size"),
        (np.zeros((4, 0), np.uint8), "zero size"),
        (np.zeros((4, 4, 2), np.uint8), r"shape \(H, W\).*got \(4, 4, 2\)"),
        (np.zeros((2, 4, 4, 3), np.uint8), "got \\(2, 4, 4, 3\\)"),
        (np.zeros(5, np.uint8), "got \\(5,\\)"),
        (np.zeros((4, 4, 3), np.int64), "unsupported dtype int64"),
        (np.zeros((4, 4, 3), bool), "unsupported dtype bool"),
        (np.full((4, 4, 3), 2.0), r"values must lie in \[0, 1\].*max 2"),
        (np.full((4, 4, 3), -0.1), r"min -0.1"),
        (np.full((4, 4, 3), np.nan), "NaN"),
    ],
)
def test_bad_arrays(array, match):
    with pytest.raises(ImageError, match=match):
        load_image(array)


def test_too_many_pixels_array():
    with pytest.raises(ImageError, match=r"too large: 10 x 10 = 100 pixels \(limit 99\)"):
        load_image(np.zeros((10, 10, 3), np.uint8), max_pixels=99)
    assert load_image(np.zeros((10, 10, 3), np.uint8), max_pixels=100).shape == (10, 10, 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(np.zeros((2, 2, 3), np.uint8), max_pixels=0)
    with pytest.raises(ValueError, match="background"):
        load_image(np.zeros((2, 2, 3), np.uint8), background=(0, 0, 300))


@pytest.mark.parametrize("obj", [123, None, [[1, 2], [3, 4]], object()])
def test_unsupported_type(obj):
    with pytest.raises(ImageError, match="cannot load an image from"):
        load_image(obj)


def test_image_error_is_value_error():
    assert issubclass(ImageError, ValueError)


# -- PIL inputs ---------------------------------------------------------------------------


def test_pil_modes(rgb):
    img = Image.fromarray(rgb)
    np.testing.assert_array_equal(load_image(img), rgb)
    gray = np.asarray(img.convert("L"))
    np.testing.assert_array_equal(load_image(img.convert("L"))[..., 1], gray)
    assert load_image(img.convert("1")).shape == (6, 5, 3)
    assert set(np.unique(load_image(img.convert("1")))) <= {0, 255}
    pal = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    np.testing.assert_array_equal(load_image(pal), np.asarray(pal.convert("RGB")))
    cmyk = load_image(img.convert("CMYK"))
    assert cmyk.shape == (6, 5, 3) and cmyk.dtype == np.uint8


def test_pil_alpha_modes():
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    out = load_image(rgba)
    assert out[0].tolist() == [[255, 255, 255], [10, 20, 30]]
    la = Image.new("LA", (1, 1), (50, 0))
    assert load_image(la)[0, 0].tolist() == [255, 255, 255]


def test_pil_palette_with_transparency():
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0  # index 0 (red) is transparent
    out = load_image(pal)
    assert out[0].tolist() == [[255, 255, 255], [0, 0, 255]]
    # And the same through a PNG file (tRNS chunk).
    assert load_image(_png_of(pal))[0].tolist() == [[255, 255, 255], [0, 0, 255]]


def _png_of(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_pil_16_bit_gray():
    a = np.array([[0, 32896, 65535]], dtype=np.uint16)
    ok, buf = cv2.imencode(".png", a)
    assert ok
    img = Image.open(io.BytesIO(buf.tobytes()))
    assert img.mode.startswith("I")
    assert load_image(img)[0, :, 0].tolist() == [0, 128, 255]
    assert load_image(buf.tobytes())[0, :, 0].tolist() == [0, 128, 255]


def test_16_bit_rgb_png():
    a = np.zeros((2, 2, 3), np.uint16)
    a[..., 2] = 65535  # BGR for OpenCV: red in RGB
    ok, buf = cv2.imencode(".png", a)
    out = load_image(buf.tobytes())
    assert out[0, 0].tolist() == [255, 0, 0]


def test_pil_zero_size():
    with pytest.raises(ImageError, match="zero size"):
        load_image(Image.new("RGB", (0, 3)))


def test_from_pil_and_to_pil(rgb):
    img = images.to_pil(rgb)
    assert img.mode == "RGB" and img.size == (5, 6)
    np.testing.assert_array_equal(images.from_pil(img), rgb)
    with pytest.raises(ImageError, match="expected a PIL image"):
        images.from_pil(rgb)  # type: ignore[arg-type]
    with pytest.raises(ImageError, match="dtype uint8"):
        images.to_pil(rgb.astype(np.float32))


def test_bgr_round_trip(rgb):
    bgr = images.to_bgr(rgb)
    np.testing.assert_array_equal(bgr[..., 0], rgb[..., 2])
    np.testing.assert_array_equal(images.from_bgr(bgr), rgb)


# -- encoded bytes and files --------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_from_bytes(rgb, fmt):
    buf = io.BytesIO()
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    Image.fromarray(rgb).save(buf, format=fmt, **kwargs)
    np.testing.assert_array_equal(load_image(buf.getvalue()), rgb)


def test_jpeg_and_gif_from_bytes(rgb):
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(buf, format="JPEG", quality=95)
    out = load_image(buf.getvalue())
    assert out.shape == (16, 16, 3) and np.abs(out.astype(int) - 200).max() <= 2
    buf = io.BytesIO()
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert load_image(buf.getvalue())[0, 0].tolist() == [255, 0, 0]  # first frame


def test_bytearray_and_memoryview(rgb):
    data = _png_bytes(rgb)
    np.testing.assert_array_equal(load_image(bytearray(data)), rgb)
    np.testing.assert_array_equal(load_image(memoryview(data)), rgb)


def test_exif_orientation_applied():
    img = Image.new("RGB", (8, 4), (255, 255, 255))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    assert load_image(buf.getvalue()).shape == (8, 4, 3)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "empty"),
        (b"not an image at all", "not a recognised image"),
        (bytes(range(256)) * 4, "not a recognised image"),
    ],
)
def test_bad_bytes(data, match):
    with pytest.raises(ImageError, match=match) as info:
        load_image(data)
    assert "object at 0x" not in str(info.value)  # no file object's repr in the message


def test_truncated_png(rgb):
    big = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _png_bytes(big)
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(data[: len(data) // 2])


def test_oversized_header_rejected_before_decoding():
    bomb = _png_with_header_size(5000, 5000)  # 25 MP claimed; the data holds 1 pixel
    with pytest.raises(ImageError, match=r"too large: 5000 x 5000"):
        load_image(bomb)
    # Far beyond Pillow's own bomb limit: refused at open, still as an ImageError.
    with pytest.raises(ImageError, match="too large"):
        load_image(_png_with_header_size(100_000, 100_000))
    with pytest.raises(ImageError, match="too large"):
        load_image(_png_with_header_size(20, 20), max_pixels=399)


def test_paths(tmp_path, rgb):
    p = tmp_path / "x.png"
    p.write_bytes(_png_bytes(rgb))
    np.testing.assert_array_equal(load_image(p), rgb)
    np.testing.assert_array_equal(load_image(str(p)), rgb)
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path)  # a folder
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="image file is empty"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "junk.png").write_bytes(b"junk" * 10)
    with pytest.raises(ImageError, match="junk.png.*not a recognised image"):
        load_image(tmp_path / "junk.png")


def test_save_image(tmp_path, rgb):
    p = images.save_image(rgb, tmp_path / "out.png")
    np.testing.assert_array_equal(load_image(p), rgb)
    with pytest.raises(ImageError, match="cannot save"):
        images.save_image(rgb, tmp_path / "out.unknownext")


@pytest.mark.parametrize("name", ["a.png", "a.JPG", "a.webp", "a.bmp"])
def test_check_image_path_accepts_what_save_image_writes(tmp_path, rgb, name):
    images.save_image(rgb, images.check_image_path(tmp_path / name))


@pytest.mark.parametrize("name", ["a.unknownext", "a", "a."])
def test_check_image_path_refuses_what_save_image_cannot_write(tmp_path, rgb, name):
    with pytest.raises(ImageError, match="unknown file extension"):
        images.check_image_path(tmp_path / name)
    with pytest.raises(ImageError):
        images.save_image(rgb, tmp_path / name)


# -- PNG and hashing ----------------------------------------------------------------------


@settings(deadline=None, max_examples=30)
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=12)
                  .map(lambda s: (s[0], s[1], 3))))  # fmt: skip
def test_png_round_trip_exact(array):
    data = images.encode_png(array)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    np.testing.assert_array_equal(images.decode_png(data), array)


def test_encode_png_validates(rgb):
    with pytest.raises(ImageError, match=r"shape \(H, W, 3\)"):
        images.encode_png(rgb[..., 0])
    with pytest.raises(ImageError, match="empty"):
        images.encode_png(np.zeros((0, 3, 3), np.uint8))


def test_decode_png_rejects_non_png(rgb):
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="BMP")
    with pytest.raises(ImageError, match="not a PNG"):
        images.decode_png(buf.getvalue())
    with pytest.raises(ImageError, match="empty"):
        images.decode_png(b"")
    with pytest.raises(ImageError, match="must be bytes"):
        images.decode_png("abc")  # type: ignore[arg-type]
    with pytest.raises(ImageError, match="corrupt or truncated|not a recognised"):
        images.decode_png(images.encode_png(rgb)[:40])


def test_content_hash(rgb):
    h = images.content_hash(rgb)
    assert len(h) == 64 and h == h.lower() and int(h, 16) >= 0
    assert h == images.content_hash(rgb.copy())
    assert h == images.content_hash(np.asfortranarray(rgb))  # memory layout does not matter
    expected = hashlib.sha256(b"rgb8:6x5\n" + rgb.tobytes()).hexdigest()
    assert h == expected
    changed = rgb.copy()
    changed[0, 0, 0] ^= 1
    assert images.content_hash(changed) != h
    # Same bytes, different shape: different hash.
    flat = np.zeros((2, 8, 3), np.uint8)
    assert images.content_hash(flat) != images.content_hash(flat.reshape(4, 4, 3))
    with pytest.raises(ImageError):
        images.content_hash(rgb.astype(np.float32))


# -- geometry -----------------------------------------------------------------------------


@pytest.mark.parametrize("w, h", [(100, 50), (30, 90), (64, 64), (17, 3), (1, 1), (300, 301)])
def test_letterbox_shapes_and_params(w, h):
    src = np.full((h, w, 3), 200, np.uint8)
    out, p = images.letterbox(src, size=64, fill=(1, 2, 3))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert p == boxes.letterbox_params(w, h, 64)
    cw, ch = p.content_size(w, h)
    content = out[p.pad_y : p.pad_y + ch, p.pad_x : p.pad_x + cw]
    assert (content == 200).all()
    # Everything outside the content area is fill.
    mask = np.ones((64, 64), bool)
    mask[p.pad_y : p.pad_y + ch, p.pad_x : p.pad_x + cw] = False
    assert (out[mask] == (1, 2, 3)).all()


def test_letterbox_square_64_is_identity(rgb):
    src = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out, p = images.letterbox(src)
    np.testing.assert_array_equal(out, src)
    assert not np.shares_memory(out, src)
    assert (p.scale, p.pad_x, p.pad_y) == (1.0, 0, 0)


def test_letterbox_boxes_follow_pixels():
    src = np.zeros((100, 200, 3), np.uint8)
    src[20:60, 40:120] = 255  # box (40, 20, 120, 60)
    out, p = images.letterbox(src, size=64, interpolation="nearest")
    b = boxes.to_letterbox((40, 20, 120, 60), p).as_int()
    ys, xs = np.nonzero(out[..., 0])
    assert abs(xs.min() - b[0]) <= 1 and abs(xs.max() + 1 - b[2]) <= 1
    assert abs(ys.min() - b[1]) <= 1 and abs(ys.max() + 1 - b[3]) <= 1


def test_letterbox_accepts_other_inputs_and_validates(rgb):
    out, _ = images.letterbox(Image.fromarray(rgb), size=16)
    assert out.shape == (16, 16, 3)
    out, _ = images.letterbox(rgb, size=32, interpolation="lanczos")
    assert out.shape == (32, 32, 3)
    with pytest.raises(ValueError, match="interpolation"):
        images.letterbox(rgb, interpolation="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fill"):
        images.letterbox(rgb, fill=(0, 0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        images.letterbox(rgb, size=0)


def test_resize_nearest(rgb):
    out = images.resize_nearest(rgb, 3)
    assert out.shape == (18, 15, 3)
    np.testing.assert_array_equal(out[::3, ::3], rgb)
    np.testing.assert_array_equal(out[2::3, 1::3], rgb)
    assert images.resize_nearest(rgb[..., 0], 2).shape == (12, 10)
    assert not np.shares_memory(images.resize_nearest(rgb, 1), rgb)
    with pytest.raises(ValueError, match="scale"):
        images.resize_nearest(rgb, 0)
    with pytest.raises(ValueError, match="scale"):
        images.resize_nearest(rgb, 1.5)  # type: ignore[arg-type]
    with pytest.raises(ImageError):
        images.resize_nearest([[1]], 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"scale 100000 .* at most {images.MAX_UPSCALED_SIDE} px a side"):
        images.resize_nearest(rgb, 100_000)  # refused before a byte is allocated


def test_resize_nearest_allows_the_largest_side_exactly(rgb, monkeypatch):
    monkeypatch.setattr(images, "MAX_UPSCALED_SIDE", 30)  # rgb is 6 x 5: scale 5 is the largest
    assert images.resize_nearest(rgb, 5).shape[:2] == (30, 25)
    with pytest.raises(ValueError, match="at most 30 px a side"):
        images.resize_nearest(rgb, 6)
