"""Build the benchmark data set: real photo cut-outs pasted onto real textures, with exact masks.

Sources (all installable here, nothing downloaded by this script):
- objects: Debian's `tuxpaint-stamps-default` (`/usr/share/tuxpaint/stamps/`): photo stamps with an alpha
  channel; `cartoon/` and `symbols/` are skipped, and so are stamps whose alpha is (almost) all opaque or
  that are too small. The alpha channel, resized with the stamp, is the ground-truth mask (alpha > 0.5).
- backgrounds: scikit-image's bundled photos `brick`, `grass`, `gravel`, `immunohistochemistry`, `moon`
  (random crops) and Debian's `gimp-data` patterns (`/usr/share/gimp/2.0/patterns/`, tiled; `Legacy/`
  skipped: those are drawn, not photographed).

    apt-get install -y --no-install-recommends tuxpaint-stamps-default gimp-data
    .venv/bin/python benchmarks/make_dataset.py --out runs/bench

writes, in the dataset layout of `axx-backend train`:

    runs/bench/binary/{train,test}/images/{Object,Background}/*.jpg      object present vs. absent
    runs/bench/binary/{train,test}/masks/Object/*.png
    runs/bench/multiclass/{train,test}/images/{Animal,Food,Plant,Background}/*.jpg
    runs/bench/multiclass/{train,test}/masks/{Animal,Food,Plant}/*.png
    runs/bench/manifest.json                                             provenance of every image

Reproducible: the stamps and textures are listed in sorted order and every random choice comes from
`numpy.random.default_rng([seed, variant, split])`. Stamps are split into train and test *by file*, so the
test split shows objects never seen in training (held-out photos); textures are shared, crops are not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

STAMPS_ROOT = Path("/usr/share/tuxpaint/stamps")
PATTERNS_ROOT = Path("/usr/share/gimp/2.0/patterns")
SKIMAGE_TEXTURES = ("brick", "grass", "gravel", "immunohistochemistry", "moon")
NEGATIVE = "Background"  # matches the default negative-class pattern: it never gets a mask
MULTICLASS = {"Animal": ("animals",), "Food": ("food",), "Plant": ("plants",)}
TEST_FRACTION = 0.3  # share of each category's stamps kept for the test split
MIN_STAMP_SIDE = 64
# Object size: the longer side of the pasted stamp as a share of the image side.
SCALE_RANGE = (0.3, 0.62)


@dataclass(frozen=True)
class Stamp:
    path: Path
    category: str  # top-level stamp folder, e.g. "animals"


def list_stamps(root: Path = STAMPS_ROOT) -> list[Stamp]:
    """Photo stamps with a usable alpha channel, sorted by path."""
    if not root.is_dir():
        sys.exit(f"{root} not found: apt-get install -y --no-install-recommends tuxpaint-stamps-default")
    stamps = []
    for path in sorted(root.rglob("*.png")):
        rel = path.relative_to(root)
        if rel.parts[0] == "symbols" or "cartoon" in rel.parts:
            continue
        rgba = _load_rgba(path)
        if rgba is None or min(rgba.size) < MIN_STAMP_SIDE:
            continue
        alpha = np.asarray(rgba)[..., 3] > 127
        # Cut-outs only: a (nearly) opaque rectangle has no object boundary to segment.
        if not 0.08 <= alpha.mean() <= 0.92:
            continue
        stamps.append(Stamp(path, rel.parts[0]))
    return stamps


def _load_rgba(path: Path) -> Image.Image | None:
    with Image.open(path) as img:
        has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
        if not has_alpha:
            return None
        return img.convert("RGBA")


def read_gimp_pattern(path: Path) -> np.ndarray:
    """A GIMP `.pat` file (header: size, version, width, height, bytes/pixel, 'GPAT', name) as RGB uint8."""
    data = path.read_bytes()
    header_size, _version, width, height, depth = struct.unpack(">5I", data[:20])
    if data[20:24] != b"GPAT":
        raise ValueError(f"{path}: not a GIMP pattern")
    pixels = np.frombuffer(data, np.uint8, width * height * depth, header_size).reshape(height, width, depth)
    if depth in (1, 2):
        pixels = np.repeat(pixels[..., :1], 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3])


def list_textures() -> list[tuple[str, np.ndarray, bool]]:
    """(name, RGB uint8 array, is_tile) for every background source, in a fixed order."""
    import skimage.data

    textures = []
    for name in SKIMAGE_TEXTURES:
        arr = np.asarray(getattr(skimage.data, name)())
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        textures.append((f"skimage:{name}", arr[..., :3].astype(np.uint8), False))
    if not PATTERNS_ROOT.is_dir():
        sys.exit(f"{PATTERNS_ROOT} not found: apt-get install -y --no-install-recommends gimp-data")
    for path in sorted(PATTERNS_ROOT.rglob("*.pat")):
        rel = path.relative_to(PATTERNS_ROOT)
        if rel.parts[0] == "Legacy":
            continue
        textures.append((f"gimp:{rel.as_posix()}", read_gimp_pattern(path), True))
    return textures


def make_background(rng: np.random.Generator, texture: np.ndarray, is_tile: bool, size: int) -> np.ndarray:
    """A size x size float RGB background in 0..1: a random crop (photos) or a random tiling (patterns)."""
    if is_tile:
        zoom = rng.uniform(1.0, 2.5)
        th, tw = texture.shape[:2]
        tile = Image.fromarray(texture).resize((max(8, round(tw * zoom)), max(8, round(th * zoom))), Image.BICUBIC)
        tile_arr = np.asarray(tile)
        reps = (size // tile_arr.shape[0] + 2, size // tile_arr.shape[1] + 2, 1)
        big = np.tile(tile_arr, reps)
        oy, ox = rng.integers(0, tile_arr.shape[0]), rng.integers(0, tile_arr.shape[1])
        crop = big[oy : oy + size, ox : ox + size]
    else:
        h, w = texture.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        oy, ox = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = np.asarray(Image.fromarray(texture[oy : oy + side, ox : ox + side]).resize((size, size), Image.BICUBIC))
    img = crop.astype(np.float32) / 255.0
    if rng.random() < 0.5:
        img = img[:, ::-1]
    # Colour and brightness jitter: the same texture should not always look the same.
    gain = rng.uniform(0.75, 1.2, size=3) * rng.uniform(0.8, 1.15)
    return np.clip(img * gain, 0, 1)


def paste(rng: np.random.Generator, background: np.ndarray, stamp: Stamp) -> tuple[np.ndarray, np.ndarray, dict]:
    """Alpha-composite one stamp at a random scale and place; returns (image, mask, placement)."""
    size = background.shape[0]
    rgba = _load_rgba(stamp.path)
    assert rgba is not None
    # Crop to the alpha's bounding box so the scale refers to the object, not to empty margins.
    rgba = rgba.crop(rgba.getchannel("A").point(lambda a: 255 if a > 127 else 0).getbbox())
    scale = rng.uniform(*SCALE_RANGE) * size / max(rgba.size)
    new_size = (max(8, round(rgba.width * scale)), max(8, round(rgba.height * scale)))
    rgba = rgba.resize(new_size, Image.LANCZOS)
    if rng.random() < 0.5:
        rgba = rgba.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(rgba, dtype=np.float32) / 255.0
    h, w = arr.shape[:2]
    y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
    colour = arr[..., :3] * rng.uniform(0.85, 1.1)
    alpha = arr[..., 3:4]
    out = background.copy()
    region = out[y : y + h, x : x + w]
    out[y : y + h, x : x + w] = np.clip(alpha * colour + (1 - alpha) * region, 0, 1)
    mask = np.zeros((size, size), bool)
    mask[y : y + h, x : x + w] = alpha[..., 0] > 0.5
    placement = {"scale": round(scale, 4), "box": [x, y, w, h]}
    return out, mask, placement


def split_stamps(stamps: Sequence[Stamp], seed: int) -> tuple[list[Stamp], list[Stamp]]:
    """Train/test split by stamp file, per category, seeded."""
    rng = np.random.default_rng([seed, 999])
    train, test = [], []
    for category in sorted({s.category for s in stamps}):
        group = [s for s in stamps if s.category == category]
        order = rng.permutation(len(group))
        n_test = max(1, round(len(group) * TEST_FRACTION))
        test += [group[i] for i in order[:n_test]]
        train += [group[i] for i in order[n_test:]]
    return train, test


def write_split(
    out: Path,
    classes: dict[str, list[Stamp]],
    n_per_class: int,
    textures: list[tuple[str, np.ndarray, bool]],
    rng: np.random.Generator,
    size: int,
) -> list[dict]:
    """`n_per_class` images per object class and as many per class of background-only images."""
    records = []
    plan = [(cls, stamps) for cls, stamps in classes.items()] + [(NEGATIVE, [])]
    for cls, stamps in plan:
        (out / "images" / cls).mkdir(parents=True, exist_ok=True)
        if stamps:
            (out / "masks" / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            name = f"{cls.lower()}_{i:04d}"
            t = int(rng.integers(len(textures)))
            tex_name, tex, is_tile = textures[t]
            img = make_background(rng, tex, is_tile, size)
            record = {"image": f"images/{cls}/{name}.jpg", "class": cls, "texture": tex_name}
            if stamps:
                stamp = stamps[int(rng.integers(len(stamps)))]
                img, mask, placement = paste(rng, img, stamp)
                Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / cls / f"{name}.png")
                record.update(
                    mask=f"masks/{cls}/{name}.png",
                    stamp=stamp.path.relative_to(STAMPS_ROOT).as_posix(),
                    area=round(float(mask.mean()), 4),
                    **placement,
                )
            Image.fromarray((img * 255).round().astype(np.uint8)).save(out / "images" / cls / f"{name}.jpg", quality=92)
            records.append(record)
    return records


def build(out: Path, size: int, seed: int, binary: tuple[int, int], multiclass: tuple[int, int]) -> dict[str, object]:
    """Write both variants under `out`; returns the manifest."""
    stamps = list_stamps()
    textures = list_textures()
    train_stamps, test_stamps = split_stamps(stamps, seed)
    manifest: dict[str, object] = {
        "seed": seed,
        "size": size,
        "stamps": {"total": len(stamps), "train": len(train_stamps), "test": len(test_stamps)},
        "textures": [name for name, _, _ in textures],
        "variants": {},
    }
    variants = {
        "binary": ({"Object": None}, binary),
        "multiclass": ({cls: folders for cls, folders in MULTICLASS.items()}, multiclass),
    }
    for v_index, (variant, (class_folders, counts)) in enumerate(variants.items()):
        splits = {}
        for s_index, (split, pool, n) in enumerate(
            (("train", train_stamps, counts[0]), ("test", test_stamps, counts[1]))
        ):
            classes = {
                cls: [s for s in pool if folders is None or s.category in folders]
                for cls, folders in class_folders.items()
            }
            rng = np.random.default_rng([seed, v_index, s_index])
            split_dir = out / variant / split
            records = write_split(split_dir, classes, n, textures, rng, size)
            splits[split] = {
                "n_per_class": n,
                "stamps_per_class": {cls: len(v) for cls, v in classes.items()},
                "images": records,
            }
        manifest["variants"][variant] = splits  # type: ignore[index]
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--binary-train", type=int, default=90, help="images per class, binary train split")
    parser.add_argument("--binary-test", type=int, default=50)
    parser.add_argument("--multiclass-train", type=int, default=40, help="images per class (4 classes)")
    parser.add_argument("--multiclass-test", type=int, default=20)
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"{args.out} is not empty: remove it first (the builder never mixes two runs)")
    start = time.perf_counter()
    manifest = build(
        args.out,
        args.size,
        args.seed,
        (args.binary_train, args.binary_test),
        (args.multiclass_train, args.multiclass_test),
    )
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    digest = hashlib.sha256()
    for path in sorted(p for p in args.out.rglob("*") if p.is_file() and p.name != "manifest.json"):
        digest.update(path.relative_to(args.out).as_posix().encode())
        digest.update(path.read_bytes())
    n_images = sum(
        len(split["images"])  # type: ignore[index]
        for splits in manifest["variants"].values()  # type: ignore[union-attr]
        for split in splits.values()
    )
    print(
        json.dumps(
            {
                "out": str(args.out),
                "images": n_images,
                "stamps": manifest["stamps"],
                "textures": len(manifest["textures"]),  # type: ignore[arg-type]
                "sha256": digest.hexdigest()[:16],
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
