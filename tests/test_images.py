"""Image decoding: modes, EXIF orientation, corrupt files and limits."""

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from axx_backend.core.annotation import Annotation
from axx_backend.core.data import Sample, iter_readable, read_folder_dataset, with_usable_mask
from axx_backend.core.images import (
    MAX_PIXELS,
    WORK_SIDE,
    ImageError,
    decode_image,
    load_image,
    load_mask,
    restore_full_size,
    scale_mask,
)
from axx_backend.core.settings import DEFAULT_IMAGE_MAX_PIXELS, Settings
from axx_backend.labelstudio.images import FetchLimits
from axx_backend.server.settings import ServerSettings


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


# --- issue 12: untrusted files ---------------------------------------------------------------------------------------
def test_formats_are_told_by_content_not_by_name():
    rgb = Image.new("RGB", (12, 8), (200, 30, 30))
    for fmt in ("PNG", "JPEG", "WEBP", "AVIF", "BMP", "TIFF", "GIF"):
        out = load_image(encode(rgb, fmt), name=f"no-extension-{fmt}")
        assert out.size == (12, 8) and out.mode == "RGB", fmt
    frames = [Image.new("RGB", (10, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    first = np.asarray(load_image(buf.getvalue()))
    assert first[0, 0, 0] > 200 and first[0, 0, 2] < 50  # an animation gives its first frame


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (
            b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
            "a.svg",
        ),
        (b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY e SYSTEM 'file:///etc/passwd'>]><x>&e;</x>", "x.png"),
        (b"<html><body><img src=x></body></html>", "page.jpg"),
        (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF", "doc.pdf"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "ghostscript.eps"),
        (b"", "empty.png"),
    ],
)
def test_files_that_are_not_images_are_refused_with_a_reason(data, name):
    with pytest.raises(ImageError, match=f"{name}: cannot read image"):
        load_image(data, name=name)


def test_a_truncated_image_is_refused():
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(ImageError, match="cut.jpg: cannot read image"):
        load_image(data[: len(data) // 2], name="cut.jpg")


def test_float_images_are_scaled_by_one_or_by_their_range():
    unit = np.array([[0.0, 0.5], [0.25, 1.0]], dtype=np.float32)  # a normalised float TIFF: not almost black
    out = np.asarray(load_image(encode(Image.fromarray(unit, mode="F"), "TIFF")))[..., 0]
    assert out.tolist() == [[0, 128], [64, 255]]
    wide = np.array([[-10.0, 0.0], [10.0, 30.0]], dtype=np.float32)  # any other range: min -> 0, max -> 255
    out = np.asarray(load_image(encode(Image.fromarray(wide, mode="F"), "TIFF")))[..., 0]
    assert out.tolist() == [[0, 64], [128, 255]]
    bad = np.array([[0.0, np.nan]], dtype=np.float32)
    with pytest.raises(ImageError, match="NaN or infinite"):
        load_image(encode(Image.fromarray(bad, mode="F"), "TIFF"), name="nan.tif")


def test_large_images_are_decoded_reduced_and_keep_their_full_size():
    big = Image.new("RGB", (4096, 3000), (10, 200, 30))
    jpeg = decode_image(encode(big, "JPEG"))  # DCT scaling: decoded at 1/4
    assert jpeg.full_size == (4096, 3000) and jpeg.image.size == (1024, 750) and jpeg.reduced
    png = decode_image(encode(Image.new("I;16", (2100, 4300)), "PNG"))  # reduced by 4 before the conversion
    assert png.full_size == (2100, 4300) and png.image.size == (525, 1075) and png.image.mode == "RGB"
    small = decode_image(encode(Image.new("RGB", (2047, 20)), "PNG"))  # under twice WORK_SIDE: as it is
    assert small.image.size == small.full_size == (2047, 20) and not small.reduced
    assert load_image(encode(big, "JPEG")).size == (4096, 3000)  # training reads the full size
    assert WORK_SIDE == 1024


def test_exif_orientation_applies_to_the_reduced_image_and_the_full_size():
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(encode(Image.new("RGB", (4000, 2400)), "JPEG", exif=exif))
    assert out.full_size == (2400, 4000) and out.image.size == (800, 1333)  # reduced by 3, then rotated


def test_the_mask_of_a_reduced_image_is_scaled_back_to_the_full_size():
    ann = Annotation("Lesion", {"Lesion": 1.0}, 0.9, 0.9, False, "", [], width=100, height=50)
    ann.mask = np.zeros((50, 100), np.uint8)
    ann.mask[10:30, 20:60] = 1
    full = restore_full_size(ann, (400, 200))
    assert (full.width, full.height) == (400, 200) and full.mask.shape == (200, 400)
    assert set(np.unique(full.mask)) == {0, 1} and abs(full.mask_area - 16 * ann.mask_area) < 0.02 * 16 * ann.mask_area
    assert restore_full_size(ann, (100, 50)) is ann
    assert scale_mask(np.ones((2, 2), np.uint8), (3, 5)).shape == (5, 3)


def test_the_pixel_limit_is_one_setting():
    assert Settings().image_max_pixels == DEFAULT_IMAGE_MAX_PIXELS == MAX_PIXELS == FetchLimits().max_pixels
    assert Settings.from_env({"AXX_IMAGE_MAX_PIXELS": "2500"}).image_max_pixels == 2500
    server = ServerSettings.from_env({"AXX_IMAGE_MAX_PIXELS": "2500"})
    assert server.limits.max_pixels == 2500


def test_a_10000px_png_decodes_in_bounded_memory(tmp_path):
    """The annotate path on a 10000x10000 grey PNG, in a fresh process: the decoded grey image (100 MB) is all it
    holds at full size; no RGB (300 MB) or float (400 MB+) copy of the full image is made."""
    path = tmp_path / "big.png"
    Image.new("L", (10_000, 10_000), 90).save(path, compress_level=1)
    code = (
        "import resource, sys; from axx_backend.core.images import decode_image; "
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        "d = decode_image(sys.argv[1]); "
        "print(d.image.size, d.full_size, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    grown_mb = int(proc.stdout.split()[-1])
    assert "(1111, 1111) (10000, 10000)" in proc.stdout, proc.stdout + proc.stderr
    assert grown_mb < 250, f"decoding grew the peak RSS by {grown_mb} MB"


# ---------------------------------------------------------------- masks of a dataset folder


def folder_with_masks(root, masks):
    """A two-class dataset folder, 40x30 images; `masks`: name -> bytes of the file at masks/Lesion/<name>.png."""
    for cls, names in {"Lesion": list(masks), "Healthy": ["h"]}.items():
        (root / "images" / cls).mkdir(parents=True)
        for name in names:
            Image.new("RGB", (40, 30), (120, 80, 60)).save(root / "images" / cls / f"{name}.png")
    (root / "masks" / "Lesion").mkdir(parents=True)
    for name, data in masks.items():
        (root / "masks" / "Lesion" / f"{name}.png").write_bytes(data)
    return root


def test_a_mask_that_cannot_be_used_costs_only_itself(tmp_path):
    """An unreadable mask, one of another size and a file that is no image are left out with a reason each; their
    images still come with their labels, and a good mask stays (a bad mask used to abort training late)."""
    good = np.zeros((30, 40), np.uint8)
    good[5:15, 10:30] = 255
    root = folder_with_masks(
        tmp_path,
        {
            "good": encode(Image.fromarray(good)),
            "broken": b"\x89PNG\r\n\x1a\n not a mask",
            "small": encode(Image.new("L", (20, 15), 255)),
            "text": b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        },
    )
    (root / "images" / "Lesion" / "._good.png").write_bytes(b"\x00\x05\x16\x07")  # a macOS AppleDouble copy
    (root / "images" / "Lesion" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (40, 30)).save(root / "images" / "Lesion" / ".ipynb_checkpoints" / "good.png")
    samples, _ = read_folder_dataset(root)
    assert len(samples) == 5 and sum(s.has_mask for s in samples) == 4  # hidden files and folders are not samples
    skipped = []
    read = {s.key: s for s, _ in iter_readable(samples, skipped)}
    assert sorted(read) == [
        "Healthy/h.png",
        "Lesion/broken.png",
        "Lesion/good.png",
        "Lesion/small.png",
        "Lesion/text.png",
    ]
    assert all(s.label == ("Healthy" if k.startswith("Healthy") else "Lesion") for k, s in read.items())
    assert [k for k, s in read.items() if s.has_mask] == ["Lesion/good.png"]
    assert (read["Lesion/good.png"].load_mask() == (good > 0)).all()
    reasons = {line.split(":")[0]: line for line in skipped}
    assert sorted(reasons) == ["Lesion/broken.png", "Lesion/small.png", "Lesion/text.png"]
    assert "mask is 20x15, its image 40x30" in reasons["Lesion/small.png"]
    assert "cannot read image" in reasons["Lesion/broken.png"]


def test_a_mask_is_read_under_the_pixel_limit_and_against_the_upright_image(tmp_path):
    path = tmp_path / "m.png"
    Image.new("L", (40, 30), 1).save(path)
    assert load_mask(path).shape == (30, 40) and load_mask(path).all()  # nonzero = foreground
    with pytest.raises(ImageError, match="over the 1000 pixel limit"):
        load_mask(path, max_pixels=1000)
    # An image stored 40x30 with EXIF "rotate 90": upright it is 30x40, and so must its mask be.
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = tmp_path / "rotated.jpg"
    Image.new("RGB", (40, 30)).save(stored, exif=exif)
    upright = load_image(stored)
    assert upright.size == (30, 40)
    for size, kept in [((30, 40), True), ((40, 30), False)]:
        Image.new("L", size, 255).save(path)
        skipped = []
        sample = with_usable_mask(Sample("x", "Lesion", stored, path), upright.size, skipped)
        assert sample.has_mask is kept and len(skipped) == (0 if kept else 1)


def test_training_reads_a_large_image_reduced_and_its_mask_at_full_size(tmp_path):
    """Training holds a batch of images at once: a large one comes as inference decodes it (reduced), and its mask
    is checked against the image's full size."""
    side = 2 * WORK_SIDE + 52
    mask = np.zeros((side, side), np.uint8)
    mask[: side // 2] = 255
    root = folder_with_masks(
        tmp_path, {"big": encode(Image.fromarray(mask)), "small": encode(Image.new("L", (40, 30)))}
    )
    Image.new("RGB", (side, side), (10, 200, 30)).save(root / "images" / "Lesion" / "big.png")
    skipped = []
    read = {s.key: (s, img) for s, img in iter_readable(read_folder_dataset(root)[0], skipped)}
    big, image = read["Lesion/big.png"]
    assert image.size == (side // 2, side // 2) and big.has_mask and big.load_mask().shape == (side, side)
    assert read["Lesion/small.png"][0].has_mask and not skipped  # an image under the work side: as it is
