"""`annotate` on a folder of odd, hostile and colliding files (issue 12): one line per file, outputs that never
collide, masks at the full size of large images. A stand-in annotator (no torch) marks red pixels."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from axx_backend import annotate_folder as module
from axx_backend.annotate_folder import annotate_folder, list_inputs, output_name
from axx_backend.core.annotation import Annotation
from axx_backend.core.settings import Settings


class RedAnnotator:
    """Red pixels are the mask; a blue image breaks the model."""

    version = "v-test"

    def __init__(self) -> None:
        self.sizes: list[tuple[int, int]] = []

    def annotate(self, images: list[Image.Image], with_heat: bool = False) -> list[Annotation]:
        out = []
        for img in images:
            arr = np.asarray(img).astype(int)
            if arr[0, 0].tolist() == [0, 0, 255]:
                raise ValueError("blue images break this model")
            self.sizes.append(img.size)
            red = ((arr[..., 0] > 150) & (arr[..., 1] < 100)).astype(np.uint8)
            ann = Annotation("Lesion", {"Lesion": 0.9}, 0.9, 0.9, False, "", [], img.width, img.height, mask=red)
            ann.heat = red.astype(np.float32) if with_heat else None
            out.append(ann)
        return out


def picture(size: tuple[int, int], box: tuple[int, int, int, int], colour: tuple[int, int, int] = (220, 20, 20)):
    arr = np.full((size[1], size[0], 3), 40, np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = colour
    return Image.fromarray(arr)


def encoded(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / ".cache").mkdir()
    small = picture((40, 30), (5, 5, 20, 15))
    (root / "x.gif").write_bytes(encoded(small, "GIF"))
    (root / "x.webp").write_bytes(encoded(picture((50, 20), (0, 0, 10, 10)), "WEBP", lossless=True))
    (root / "x.png").write_bytes(encoded(small, "PNG"))
    (root / "x").write_bytes(encoded(small, "JPEG", quality=95))  # no extension: a JPEG all the same
    (root / "x.png.png").write_bytes(encoded(small, "PNG"))  # would collide with x.png's output if it were "x.png"
    (root / "photo.avif").write_bytes(encoded(small, "AVIF"))
    (root / "sub" / "x.jpg").write_bytes(encoded(small, "JPEG"))
    (root / "large.png").write_bytes(encoded(picture((2600, 2100), (260, 210, 1300, 1050)), "PNG"))
    (root / "blue.png").write_bytes(encoded(Image.new("RGB", (8, 8), (0, 0, 255)), "PNG"))
    (root / "scan.pdf").write_bytes(b"%PDF-1.4\n%%EOF\n")
    (root / "logo.svg").write_bytes(b"<svg xmlns='http://www.w3.org/2000/svg'/>")
    (root / "page.png").write_bytes(b"<html><body>not a picture</body></html>")
    (root / "cut.jpg").write_bytes(encoded(picture((64, 64), (0, 0, 8, 8)), "JPEG")[:300])
    (root / ".hidden.png").write_bytes(encoded(small, "PNG"))
    (root / ".cache" / "thumb.png").write_bytes(encoded(small, "PNG"))
    return root


def run(folder: Path, out: Path, monkeypatch: pytest.MonkeyPatch, **settings: Any) -> tuple[dict, dict, RedAnnotator]:
    annotator = RedAnnotator()
    monkeypatch.setattr(module, "load_annotator", lambda *a, **k: annotator)
    summary = annotate_folder(folder, out, "unused-model-dir", Settings(batch_size=3, **settings))
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    by_path = {line["path"]: line for line in lines}
    assert len(by_path) == len(lines)
    return summary, by_path, annotator


def test_one_line_per_file_and_no_two_inputs_share_an_output(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    summary, lines, _ = run(folder, out, monkeypatch)
    images = {"x.gif", "x.webp", "x.png", "x", "x.png.png", "photo.avif", "sub/x.jpg", "large.png"}
    refused = {"scan.pdf", "logo.svg", "page.png", "cut.jpg", "blue.png"}
    assert set(lines) == images | refused  # hidden files skipped, nothing else lost
    assert summary["images"] == len(images | refused) and summary["errors"] == len(refused)
    for path in refused:
        assert path in lines[path]["error"], lines[path]
    assert "not a PNG, JPEG" in lines["logo.svg"]["error"] and "blue images break" in lines["blue.png"]["error"]
    masks = {lines[p]["mask"] for p in images}
    assert len(masks) == len(images) and masks == {f"masks/{p}.png" for p in images}
    assert sorted(p.relative_to(out / "masks").as_posix() for p in (out / "masks").rglob("*.png")) == sorted(
        f"{p}.png" for p in images
    )
    for path in images:
        mask = np.asarray(Image.open(out / lines[path]["mask"]))
        assert mask.shape == (lines[path]["height"], lines[path]["width"])
        assert int((mask > 0).sum()) == lines[path]["mask_area"] > 0
    assert (lines["x.webp"]["width"], lines["x.gif"]["width"]) == (50, 40)  # x.gif and x.webp kept apart


def test_large_images_are_annotated_reduced_with_masks_at_full_size(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    _, lines, annotator = run(folder, out, monkeypatch)
    assert max(max(size) for size in annotator.sizes) < 2048  # the model never saw the 2600 px image
    line = lines["large.png"]
    assert (line["width"], line["height"]) == (2600, 2100)
    mask = np.asarray(Image.open(out / "masks" / "large.png.png")) > 0
    assert mask.shape == (2100, 2600)
    truth = np.zeros_like(mask)
    truth[210:1050, 260:1300] = True
    assert (mask & truth).sum() / (mask | truth).sum() > 0.99
    assert Image.open(out / "overlays" / "large.png.png").size == (1300, 1050)  # overlays stay reduced
    assert Image.open(out / "overlays" / "x.gif.png").size == (40, 30)


def test_pixel_limit_setting_applies_to_annotate(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, lines, _ = run(folder, tmp_path / "out", monkeypatch, image_max_pixels=100_000)
    assert "pixel limit" in lines["large.png"]["error"] and "mask" in lines["x.png"]


def test_inputs_skip_hidden_files_and_the_output_folder(folder: Path) -> None:
    (folder / "out").mkdir()
    (folder / "out" / "x.png.png").write_bytes(b"an earlier run's output")
    found = [p.relative_to(folder).as_posix() for p in list_inputs(folder, exclude=folder / "out")]
    assert "out/x.png.png" not in found and ".hidden.png" not in found and ".cache/thumb.png" not in found
    assert output_name(Path("a/x.gif")) == Path("a/x.gif.png") and output_name(Path("x")) == Path("x.png")
