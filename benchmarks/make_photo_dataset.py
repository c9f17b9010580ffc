"""Build the photograph benchmark: photo cut-outs pasted onto real photographs, with exact masks.

Sources (all installable here, nothing downloaded by this script):
- objects: Debian's `tuxpaint-stamps-default` photo stamps with alpha, listed as in `make_dataset.py`
  (`symbols/` and `cartoon/` skipped, nearly opaque or tiny stamps skipped), minus the few too thin to
  cover 3 % of the image. The alpha channel, resized with the stamp, is the mask (alpha > 0.5).
- backgrounds: the photographs in `PHOTOS` (KDE `plasma-workspace-wallpapers`, `mate-backgrounds`
  nature, scikit-image's bundled photos), each a random crop (side 20-100 % of the photo's short side,
  aspect within 15 % of 1, random flip) resized to the image size.

    apt-get install -y --no-install-recommends tuxpaint-stamps-default plasma-workspace-wallpapers mate-backgrounds
    .venv/bin/python benchmarks/make_photo_dataset.py --out runs/photo

writes, in the dataset layout of `axx-backend train`:

    runs/photo/binary/{train,test}/images/{Object,Background}/NNNN.jpg
    runs/photo/binary/{train,test}/masks/Object/NNNN.png                   0/255
    runs/photo/multiclass/{train,test}/images/{Animal,Food,Plant,Background}/NNNN.jpg
    runs/photo/multiclass/{train,test}/masks/{Animal,Food,Plant}/NNNN.png
    runs/photo/manifest.json        provenance of every image (photo, crop box, stamp, area, position, seed)
    runs/photo/examples.png         12 examples with their mask outlines, to look at

`--composite natural` builds the same images (same crops, stamps, sizes and places: the extra random draws
come after the paste's) with the cues of a paste taken away, to check that masks do not lean on them: the
stamp's colour cast moved halfway to its surroundings' (per-channel gains at equal brightness), the stamp softened
(Gaussian, sigma 0-1 px) and its alpha feathered (sigma 0.7-2 px), then every image, background images
too, gets the same sensor noise (sigma 0.5-3 % of the range) and a JPEG quality drawn in 70-92. The mask stays
the unfeathered alpha > 0.5.

Held out by file: both the stamps (per category) and the photographs are split ~70/30 between train and
test, so a test image shows an object and a background never seen in training. Within a split the stamps
and the photos are used in balanced rounds (each once before any twice), so with at least half as many
stamps as images no stamp appears more than twice, and a validation split taken from train shows mostly
unseen objects too. Deterministic: every random choice comes from `numpy.random.default_rng` seeded by
(seed, variant, split[, class, image]); the same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from make_dataset import STAMPS_ROOT, Stamp, list_stamps, split_stamps
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

WALLPAPERS_ROOT = Path("/usr/share/wallpapers")
MATE_NATURE_ROOT = Path("/usr/share/backgrounds/mate/nature")
# The photographs used as backgrounds, sorted. Every candidate was looked at; left out:
# - KDE wallpapers that are renders, drawings or abstract art: Altai, Autumn, Canopee, Cascade, Cluster,
#   Elarun, Flow, FlyingKonqui, Honeywave, IceCold, Kay, Kokkini, MilkyWay, Opal, PastelHills, Patak,
#   SafeLanding, Shell, Volna;
# - all of /usr/share/backgrounds/*.jpg|png (ukui): renders and illustrations (2004default, calla, city,
#   desert, firstgeneration, fluent-color, focal-ubuntukylin, goldfish, rhythm, rollpaper, string, the-mouse);
# - photographs whose subject is itself an instance of a benchmark class, which would make a Background
#   image a true Animal/Food/Plant image (label noise) and put a second, unmasked object into positives:
#   skimage `chelsea` and `cat` (a cat's face), `coffee` (a cup of espresso), mate LadyBird (a ladybird),
#   FreshFlower, Garden, YellowFlower (flower heads) and TwoWings (a dandelion seed head). Vegetation as
#   scenery or surface (grass, forest, moss, leaves) stays;
# - for the same reason, photographs whose subject is an object of the kind the binary `Object` class pastes
#   (the stamps show people, vehicles, household things, toys): skimage `astronaut` and `camera` (people),
#   `rocket` and `motorcycle_left` (vehicles), `coins`; KDE Kite (a kite), EveningGlow (boats), ColorfulCups
#   (cups), FallenLeaf and OneStandsOut (one leaf in focus); mate Aqua (a water-drop crown). With them, 18 of
#   the 20 test errors of a labels-only version were Background crops of Kite and Aqua called Object: a
#   kite and a splash in a picture are objects, the labels said there was none;
# - scikit-image images that are not camera photographs of a scene or surface: microscopy
#   (`immunohistochemistry`, `cell`), fundus imaging (`retina`, `microaneurysms`), documents (`page`,
#   `text`), a featureless motion blur (`clock`), and the synthetic ones.
PHOTOS = (
    "mate:Blinds.jpg",
    "mate:Dune.jpg",
    "mate:GreenMeadow.jpg",
    "mate:RainDrops.jpg",
    "mate:Storm.jpg",
    "mate:Wood.jpg",
    "skimage:brick",
    "skimage:grass",
    "skimage:gravel",
    "skimage:hubble_deep_field",
    "skimage:moon",
    "wallpaper:BytheWater",
    "wallpaper:ColdRipple",
    "wallpaper:DarkestHour",
    "wallpaper:Grey",
    "wallpaper:Path",
    "wallpaper:summer_1am",
)
NEGATIVE = "Background"  # matches the default negative-class pattern: it never gets a mask
MULTICLASS = {"Animal": "animals", "Food": "food", "Plant": "plants"}
TEST_FRACTION = 0.3  # share of the photographs (and, in make_dataset, of each stamp category) held out
CROP_SIDE_RANGE = (0.2, 1.0)  # crop side as a share of the photo's short side
MAX_ASPECT = 1.15  # crop aspect ratio drawn log-uniformly in [1/MAX_ASPECT, MAX_ASPECT]
AREA_RANGE = (0.03, 0.30)  # object mask area as a share of the image, drawn log-uniformly
# Photos are decoded once and kept at most this short side: the smallest crop (20 %) still has
# 256 px to resize from, and 28 photos fit in ~250 MB instead of ~1.5 GB.
MAX_PHOTO_SHORT_SIDE = 1280
COMPOSITES = ("paste", "natural")
HARMONISE = 0.5  # natural: share of the way the stamp's colour cast moves to its surroundings'
FEATHER_SIGMA = (0.7, 2.0)  # natural: Gaussian sigma (px) of the alpha's edge
SOFTEN_SIGMA = (0.0, 1.0)  # natural: Gaussian sigma (px) of the stamp itself
NOISE_SIGMA = (0.005, 0.03)  # natural: sensor noise over the whole image, share of the range
JPEG_QUALITY = (70, 92)  # natural: drawn per image (paste: always 92)
VARIANTS = ("binary", "multiclass")
SPLITS = ("train", "test", "pool")


# ---------------------------------------------------------------- backgrounds


def photo_file(source: str) -> str:
    """The file (or skimage name) a `PHOTOS` entry stands for; a KDE wallpaper is its largest image."""
    kind, name = source.split(":", 1)
    if kind == "skimage":
        return source
    if kind == "mate":
        return str(MATE_NATURE_ROOT / name)
    # Most sizes of a KDE wallpaper are symlinks to one file; `images_dark/` variants count as candidates.
    files = {p.resolve() for p in (WALLPAPERS_ROOT / name / "contents").glob("images*/*") if p.is_file()}
    if not files:
        sys.exit(f"wallpaper {name} not found: apt-get install -y --no-install-recommends plasma-workspace-wallpapers")
    return str(max(files, key=lambda p: (p.stat().st_size, str(p))))


@functools.cache
def load_photo(source: str) -> tuple[Image.Image, float, tuple[int, int]]:
    """(RGB image at most MAX_PHOTO_SHORT_SIDE on its short side, its scale from the original, original size)."""
    if source.startswith("skimage:"):
        import skimage.data

        name = source.split(":", 1)[1]
        # skimage calls the left view of its stereo pair `motorcycle_left` in its gallery; it is not a function.
        arr = skimage.data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(skimage.data, name)()
        img = Image.fromarray(np.asarray(arr)).convert("RGB")
    else:
        path = Path(photo_file(source))
        if not path.is_file():
            sys.exit(f"{path} not found: apt-get install -y --no-install-recommends mate-backgrounds")
        with Image.open(path) as opened:
            img = opened.convert("RGB")
    original = img.size
    scale = min(1.0, MAX_PHOTO_SHORT_SIDE / min(original))
    if scale < 1.0:
        img = img.resize((round(original[0] * scale), round(original[1] * scale)), Image.BICUBIC)
    return img, scale, original


def split_photos(photos: Sequence[str], seed: int) -> tuple[list[str], list[str]]:
    """Train/test split by photograph, seeded (its own stream: the stamps' split does not move it)."""
    order = np.random.default_rng([seed, 998]).permutation(len(photos))
    n_test = max(1, round(len(photos) * TEST_FRACTION))
    test = sorted(photos[i] for i in order[:n_test])
    train = sorted(photos[i] for i in order[n_test:])
    return train, test


def crop_background(rng: np.random.Generator, source: str, size: int) -> tuple[np.ndarray, dict]:
    """A random crop of the photo, resized to size x size: (float RGB in 0..1, provenance)."""
    img, scale, (width, height) = load_photo(source)
    side = rng.uniform(*CROP_SIDE_RANGE) * min(width, height)
    aspect = math.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT)))
    crop_w = min(width, round(side * math.sqrt(aspect)))
    crop_h = min(height, round(side / math.sqrt(aspect)))
    x0 = int(rng.integers(0, width - crop_w + 1))
    y0 = int(rng.integers(0, height - crop_h + 1))
    box = (x0, y0, x0 + crop_w, y0 + crop_h)  # in the original photo's pixels
    crop = img.resize((size, size), Image.BICUBIC, box=tuple(v * scale for v in box))
    flip = bool(rng.random() < 0.5)
    if flip:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    record = {"source": source, "file": photo_file(source), "crop_box": list(box), "flip": flip}
    return np.asarray(crop, dtype=np.float32) / 255.0, record


# ---------------------------------------------------------------- objects


@functools.cache
def load_cutout(path: Path) -> Image.Image:
    """The stamp as RGBA, cropped to its alpha's bounding box (so sizes refer to the object)."""
    with Image.open(path) as img:
        rgba = img.convert("RGBA")
    return rgba.crop(rgba.getchannel("A").point(lambda a: 255 if a > 127 else 0).getbbox())


def max_area_fraction(cutout: Image.Image) -> float:
    """The largest mask area (share of a square image) the cut-out reaches when its long side fills the image."""
    coverage = float((np.asarray(cutout.getchannel("A")) > 127).mean())
    return coverage * cutout.width * cutout.height / max(cutout.size) ** 2


def usable_stamps() -> list[Stamp]:
    """`make_dataset.list_stamps`, minus cut-outs too thin to cover the smallest area even at full size."""
    return [s for s in list_stamps() if max_area_fraction(load_cutout(s.path)) >= AREA_RANGE[0] * 1.1]


def paste_stamp(
    rng: np.random.Generator, background: np.ndarray, stamp: Stamp, composite: str = "paste"
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Alpha-composite the stamp at a log-uniform area fraction and a random place: (image, mask, provenance)."""
    size = background.shape[0]
    cutout = load_cutout(stamp.path)
    coverage = float((np.asarray(cutout.getchannel("A")) > 127).mean())
    # A thin cut-out may not reach 30 % even when it spans the image: cap the draw at what it can cover.
    high = min(AREA_RANGE[1], 0.95 * max_area_fraction(cutout))
    target = math.exp(rng.uniform(math.log(AREA_RANGE[0]), math.log(high)))
    scale = math.sqrt(target * size * size / (coverage * cutout.width * cutout.height))
    new_size = (min(size, max(1, round(cutout.width * scale))), min(size, max(1, round(cutout.height * scale))))
    rgba = cutout.resize(new_size, Image.LANCZOS)
    flip = bool(rng.random() < 0.5)
    if flip:
        rgba = rgba.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(rgba, dtype=np.float32) / 255.0
    h, w = arr.shape[:2]
    y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
    # Mild colour and brightness jitter: a stamp reused in train should not look identical twice.
    gain = rng.uniform(0.9, 1.1, size=3) * rng.uniform(0.85, 1.15)
    alpha = np.clip(arr[..., 3:4], 0.0, 1.0)
    rgb = np.clip(arr[..., :3] * gain, 0, 1)
    mask = np.zeros((size, size), bool)
    mask[y : y + h, x : x + w] = alpha[..., 0] > 0.5
    natural = {}
    if composite == "natural":
        rgb, alpha, natural = blend_in(rng, rgb, alpha, background[y : y + h, x : x + w])
    # On the whole canvas, so that a feathered edge can reach past the stamp's box.
    canvas_rgb, canvas_alpha = np.zeros(background.shape), np.zeros((size, size, 1), np.float32)
    canvas_rgb[y : y + h, x : x + w], canvas_alpha[y : y + h, x : x + w] = rgb, alpha
    if composite == "natural":
        canvas_alpha = feathered(canvas_alpha, natural["feather"])
    out = np.clip(canvas_alpha * canvas_rgb + (1 - canvas_alpha) * background, 0, 1).astype(np.float32)
    record = {
        "stamp": stamp.path.relative_to(STAMPS_ROOT).as_posix()
        if stamp.path.is_relative_to(STAMPS_ROOT)
        else str(stamp.path),
        "category": stamp.category,
        "target_area": round(target, 4),
        "area": round(float(mask.mean()), 4),
        "box": [x, y, w, h],
        "flip": flip,
        "gain": [round(float(g), 3) for g in gain],
        **natural,
    }
    return out, mask, record


def blend_in(
    rng: np.random.Generator, rgb: np.ndarray, alpha: np.ndarray, region: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict]:
    """The stamp's colour cast moved `HARMONISE` of the way to its surroundings' (per-channel gains that keep
    its brightness: the scene's white balance, not its contrast) and the stamp softened; the alpha's feather is
    drawn here and applied on the canvas (`feathered`)."""
    # The surroundings: the background inside the stamp's box around the stamp (the whole box if it fills it).
    inside, around = alpha[..., 0] > 0.5, alpha[..., 0] <= 0.5
    reference = region[around] if inside.any() and around.sum() >= 16 else region.reshape(-1, 3)
    src = rgb[inside].mean(0) + 1e-3 if inside.any() else np.ones(3)
    ref = reference.mean(0) + 1e-3
    gains = ((ref / ref.mean()) / (src / src.mean())) ** HARMONISE  # towards the surroundings' colour cast
    gains *= src.mean() / (src * gains).mean()  # at the stamp's own brightness
    rgb = np.clip(rgb * gains, 0, 1)
    soften = float(rng.uniform(*SOFTEN_SIGMA))
    feather = float(rng.uniform(*FEATHER_SIGMA))
    # Softened where it is opaque only: blurring the transparent pixels' colours in would tint the edge.
    weight = gaussian_filter(alpha[..., 0], soften) + 1e-6
    rgb = np.clip(gaussian_filter(rgb * alpha, sigma=(soften, soften, 0)) / weight[..., None], 0, 1)
    return rgb.astype(np.float32), alpha, {"soften": round(soften, 3), "feather": round(feather, 3)}


def feathered(alpha: np.ndarray, sigma: float) -> np.ndarray:
    return np.clip(gaussian_filter(alpha, sigma=(sigma, sigma, 0)), 0, 1).astype(np.float32)


def sensor(rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, int, float]:
    """Noise over the whole image and a JPEG quality, both drawn: (image, quality, noise sigma)."""
    sigma = float(rng.uniform(*NOISE_SIGMA))
    quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    return np.clip(image + rng.normal(0.0, sigma, image.shape).astype(np.float32), 0, 1), quality, sigma


# ---------------------------------------------------------------- writing


def balanced_draws(rng: np.random.Generator, n_items: int, n_draws: int) -> list[int]:
    """`n_draws` indices into `n_items`, in shuffled rounds: every item once before any item twice."""
    rounds = math.ceil(n_draws / n_items)
    return [int(i) for _ in range(rounds) for i in rng.permutation(n_items)][:n_draws]


@dataclass(frozen=True)
class SplitPlan:
    variant: str
    split: str
    classes: dict[str, list[Stamp]]  # positive class -> its stamps; NEGATIVE is added with none
    photos: list[str]
    n_per_class: int


def write_split(out: Path, plan: SplitPlan, seed: int, size: int, composite: str = "paste") -> list[dict]:
    """Write the split's images (and masks) under `out/variant/split`; returns their manifest records."""
    split_dir = out / plan.variant / plan.split
    v_index, s_index = VARIANTS.index(plan.variant), SPLITS.index(plan.split)
    # The assignment of stamps and photos to images comes from one stream per split; each image's geometry
    # from its own stream, so an image can be reproduced from its manifest record alone.
    assign_rng = np.random.default_rng([seed, v_index, s_index])
    all_classes = [*plan.classes, NEGATIVE]
    photo_seq = balanced_draws(assign_rng, len(plan.photos), plan.n_per_class * len(all_classes))
    unlabelled = plan.split == "pool"  # one flat folder in shuffled order: nothing in a path names the class
    names = assign_rng.permutation(plan.n_per_class * len(all_classes)) if unlabelled else None
    records = []
    for c_index, cls in enumerate(all_classes):
        stamps = plan.classes.get(cls, [])
        stamp_seq = balanced_draws(assign_rng, len(stamps), plan.n_per_class) if stamps else []
        (split_dir / "images" / ("" if unlabelled else cls)).mkdir(parents=True, exist_ok=True)
        for i in range(plan.n_per_class):
            rng_key = [seed, v_index, s_index, c_index, i]
            rng = np.random.default_rng(rng_key)
            image, background = crop_background(rng, plan.photos[photo_seq[c_index * plan.n_per_class + i]], size)
            name = f"{cls}/{i:04d}" if names is None else f"{names[c_index * plan.n_per_class + i]:04d}"
            rel_image = f"{plan.variant}/{plan.split}/images/{name}.jpg"
            record = {"image": rel_image, "class": cls, "rng": rng_key, "background": background}
            if stamps:
                image, mask, record["object"] = paste_stamp(rng, image, stamps[stamp_seq[i]], composite)
            if stamps and not unlabelled:
                record["mask"] = f"{plan.variant}/{plan.split}/masks/{cls}/{i:04d}.png"
                (out / record["mask"]).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255).save(out / record["mask"])
            quality = 92
            if composite == "natural":  # every image, negatives too: noise and compression are no class cue
                image, quality, record["noise"] = sensor(rng, image)
                record["jpeg_quality"] = quality
            Image.fromarray((image * 255).round().astype(np.uint8)).save(out / rel_image, quality=quality)
            records.append(record)
    return records


def plan_splits(stamps: list[Stamp], photos: Sequence[str], seed: int, counts: dict) -> list[SplitPlan]:
    train_stamps, test_stamps = split_stamps(stamps, seed)
    train_photos, test_photos = split_photos(photos, seed)
    plans = []
    # the pool shows the test split's objects and photos, in other images
    sources = {"train": (train_stamps, train_photos), "test": (test_stamps, test_photos)}
    sources["pool"] = sources["test"]
    for variant in VARIANTS:
        for split, (pool, split_photos_) in sources.items():
            if not counts[variant].get(split):
                continue  # (no pool by default: the default set's bytes stay as they were)
            if variant == "binary":
                classes = {"Object": list(pool)}
            else:
                classes = {cls: [s for s in pool if s.category == folder] for cls, folder in MULTICLASS.items()}
            plans.append(SplitPlan(variant, split, classes, split_photos_, counts[variant][split]))
    return plans


def split_summary(plan: SplitPlan, records: list[dict]) -> dict:
    """Counts of one split: images per class, distinct stamps and the most uses of one stamp, area range."""
    per_class = {}
    for cls in [*plan.classes, NEGATIVE]:
        recs = [r for r in records if r["class"] == cls]
        uses = Counter(r["object"]["stamp"] for r in recs if "object" in r)
        areas = [r["object"]["area"] for r in recs if "object" in r]
        per_class[cls] = {
            "images": len(recs),
            "stamps_available": len(plan.classes.get(cls, [])),
            "stamps_used": len(uses),
            "max_uses_of_a_stamp": max(uses.values(), default=0),
            "area_min": min(areas, default=None),
            "area_max": max(areas, default=None),
        }
    return {"photos": plan.photos, "classes": per_class}


# ---------------------------------------------------------------- examples picture


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of the mask with a 4-neighbour outside it (a 1-px inner boundary)."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def write_examples(out: Path, records: list[dict], path: Path, n: int = 12, tile: int = 240) -> None:
    """A 4 x 3 grid of positive images spread over variants, splits and classes, with their mask outlines."""
    positives = [r for r in records if "mask" in r]
    picks = [positives[round(k * (len(positives) - 1) / (n - 1))] for k in range(n)]
    grid = Image.new("RGB", (4 * tile, 3 * (tile + 16)), "white")
    draw = ImageDraw.Draw(grid)
    for k, rec in enumerate(picks):
        image = np.asarray(Image.open(out / rec["image"]).convert("RGB")).copy()
        mask = np.asarray(Image.open(out / rec["mask"])) > 0
        outline = mask_outline(mask)
        outline |= np.roll(outline, 1, 0) | np.roll(outline, 1, 1)  # 2 px, visible after downscaling
        image[outline] = (255, 0, 0)
        x, y = (k % 4) * tile, (k // 4) * (tile + 16)
        grid.paste(Image.fromarray(image).resize((tile, tile), Image.BILINEAR), (x, y + 16))
        split = rec["image"].split("/")[1]
        draw.text((x + 2, y + 2), f"{rec['class']} {split} {100 * rec['object']['area']:.1f}%", fill="black")
    grid.save(path)


# ---------------------------------------------------------------- main


def build(out: Path, size: int, seed: int, counts: dict, composite: str = "paste") -> dict:
    stamps = usable_stamps()
    plans = plan_splits(stamps, PHOTOS, seed, counts)
    manifest: dict = {"seed": seed, "size": size, "photos": list(PHOTOS), "variants": {}, "images": []}
    if composite != "paste":  # the default's manifest, and so its digest, stay as they were
        manifest["composite"] = composite
    manifest["stamps"] = stamp_counts(stamps, seed)
    for plan in plans:
        start = time.perf_counter()
        records = write_split(out, plan, seed, size, composite)
        manifest["variants"].setdefault(plan.variant, {})[plan.split] = split_summary(plan, records)
        manifest["images"] += records
        print(f"{plan.variant}/{plan.split}: {len(records)} images in {time.perf_counter() - start:.0f} s", flush=True)
    write_examples(out, manifest["images"], out / "examples.png")
    return manifest


def stamp_counts(stamps: list[Stamp], seed: int) -> dict:
    train, test = split_stamps(stamps, seed)
    return {
        "total": len(stamps),
        "train": dict(sorted(Counter(s.category for s in train).items())),
        "test": dict(sorted(Counter(s.category for s in test).items())),
    }


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def print_summary(manifest: dict) -> None:
    print(f"stamps: {json.dumps(manifest['stamps'])}")
    for variant, splits in manifest["variants"].items():
        for split, summary in splits.items():
            print(f"{variant}/{split}: {len(summary['photos'])} photos")
            for cls, c in summary["classes"].items():
                areas = "" if c["area_min"] is None else f", area {c['area_min']:.3f}-{c['area_max']:.3f}"
                stamps = (
                    f", {c['stamps_used']}/{c['stamps_available']} stamps, each at most {c['max_uses_of_a_stamp']}x"
                    if c["stamps_available"]
                    else ""
                )
                print(f"  {cls}: {c['images']} images{stamps}{areas}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/photo"))
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--binary-train", type=int, default=100, help="images per class (Object, Background)")
    parser.add_argument("--binary-test", type=int, default=100)
    parser.add_argument("--multiclass-train", type=int, default=50, help="images per class (4 classes)")
    parser.add_argument("--multiclass-test", type=int, default=40)
    parser.add_argument(
        "--pool", type=int, default=0, metavar="N",
        help="also write VARIANT/pool/images/NNNN.jpg: N unlabelled images per class of each variant, new images of "
        "the test split's objects and photos (a project's tasks still to annotate: `axx-backend train --unlabelled`)",
    )  # fmt: skip
    parser.add_argument(
        "--composite", choices=COMPOSITES, default="paste",
        help="natural: harmonised colours, feathered edges, sensor noise and JPEG on every image",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"{args.out} is not empty: remove it first (the builder never mixes two runs)")
    counts = {
        "binary": {"train": args.binary_train, "test": args.binary_test, "pool": args.pool},
        "multiclass": {"train": args.multiclass_train, "test": args.multiclass_test, "pool": args.pool},
    }
    start = time.perf_counter()
    manifest = build(args.out, args.size, args.seed, counts, args.composite)
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print_summary(manifest)
    summary = {"out": str(args.out), "images": len(manifest["images"]), "sha256": tree_digest(args.out)}
    print(json.dumps({**summary, "seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
