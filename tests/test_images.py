"""Image decoding: modes, EXIF orientation, corrupt files and limits."""

import io

import numpy as np
import pytest
from PIL import Image

from axx_backend.core.images import ImageError, load_image


def encode(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_16bit_grayscale_is_scaled_by_its_range():
    arr = np.array([[1000, 2000], [3000, 5000]], dtype=np.uint16)
    out = np.asarray(load_image(encode(Image.fromarray(arr))))
    assert out.shape == (2, 2, 3)
    assert out[0, 0, 0] == 0 and out[1, 1, 0] == 255
    assert out[0, 1, 0] == pytest.approx(255 * 1000 / 4000, abs=1)


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    img.putpixel((1, 0), (0, 0, 0, 0))
    out = np.asarray(load_image(encode(img)))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]


def test_cmyk_and_grayscale_become_rgb():
    cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))  # red
    out = np.asarray(load_image(encode(cmyk, "JPEG", quality=100)))
    assert out.shape == (3, 3, 3) and out[1, 1, 0] > 200 and out[1, 1, 1] < 60
    gray = np.asarray(load_image(encode(Image.new("L", (2, 2), 77))))
    assert gray.shape == (2, 2, 3) and (gray == 77).all()


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (4, 2), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = load_image(encode(img, "JPEG", exif=exif))
    assert out.size == (2, 4)


def test_corrupt_and_oversized_images_fail_with_their_name():
    with pytest.raises(ImageError, match="scan_7.png"):
        load_image(b"\x89PNG not really", name="scan_7.png")
    with pytest.raises(ImageError, match="pixel limit"):
        load_image(encode(Image.new("L", (100, 100))), name="big.png", max_pixels=50 * 50)
