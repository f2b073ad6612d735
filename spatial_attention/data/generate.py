"""Offline generators for the two data sets (data/README.md):

* ``generate_shapeworld``: folders in the format of ShapeWorld's
  ``agreement/relational`` output with ``spatial_twoshapes`` (same files, same
  world_model.json schema and key order, same caption grammar), for users
  without the real data. Shapes, size ranges, shades and rotation follow
  ShapeWorld's definitions; unlike real output, bounding boxes are exact and
  the two shapes never overlap, so every caption is plainly true of the picture.
* ``generate_counterfactual``: the fixed-position pairs of the corner
  experiments (a full image and its control without the subject).

Everything is seeded (same seed -> identical bytes) and every file is written
through a temporary file and a rename, so an interrupted run never leaves a
half-written file that looks complete. ``main`` is the ``generate_data.py`` CLI.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from spatial_attention.common.console import HelpFormatter, check_at_least, command_parser, user_errors_exit
from spatial_attention.common.errors import DataError, OptionError
from spatial_attention.common.runio import setup_logging, write_atomic
from spatial_attention.data.counterfactual import CORNER_WORDS, CORNERS, RELATION_OF_CORNER
from spatial_attention.data.shapeworld import COLORS, DEFAULT_SHAPEWORLD, RELATIONS, SHAPES, format_caption, list_shards

log = logging.getLogger("spatial_attention")

SIZE_RANGE = (0.05, 0.125)  # half-extent of a shape, fraction of the image side
DISTORTION_RANGE = (2.0, 3.0)  # width / height of rectangles and ellipses
SHADE_RANGE = 0.4
GOLDEN = math.sqrt(5.0) / 2.0 - 0.5  # pentagon vertex ratio, as in ShapeWorld
ASPECT = {"triangle": math.sqrt(0.75), "pentagon": math.cos(0.1 * math.pi), "semicircle": 0.5}  # y / x, regular shapes
BACKGROUND_LIGHT = (245, 245, 245)  # counterfactual pairs
MIN_IMAGE_SIZE = 32  # below this the thinnest shapes may cover no pixel centre
# No model here takes more than 3584 px a side (Qwen2-VL's processor limit; LLaVA-1.5 takes 336), so a larger
# picture is only scaled down; and drawing holds the picture and a few float64 image-sized arrays per shape:
# about 130 MB each at 4096 px, while at 100000 px the picture alone is 28 GiB (numpy's bare out-of-memory error).
MAX_IMAGE_SIZE = 4096

Box = tuple[float, float, float, float]


# ----------------------------------------------------------------------------- geometry
# A shape lives in local coordinates centred on its box centre (y downward);
# ``rotation`` (a fraction of a turn) maps local to image offsets by
# (x, y) -> (x cos t - y sin t, x sin t + y cos t), t = 2 pi rotation.

def sample_half_size(shape: str, rng: np.random.Generator,
                     size_range: tuple[float, float] = SIZE_RANGE) -> tuple[float, float]:
    """Half-extents (x, y) drawn as ShapeWorld does: x in ``size_range``, y fixed
    by the shape's proportions, or x / distortion for rectangles and ellipses
    (the more distorted, the larger the least x, as in ShapeWorld)."""
    low, high = size_range
    if shape in ("rectangle", "ellipse"):
        distortion = rng.uniform(*DISTORTION_RANGE)
        ratio = (distortion - DISTORTION_RANGE[0]) / (DISTORTION_RANGE[1] - DISTORTION_RANGE[0])
        x = rng.uniform(low + (high - low) * ratio * 0.5, high)
        return x, x / distortion
    x = rng.uniform(low, high)
    return x, x * ASPECT.get(shape, 1.0)


def _polygon(shape: str, sx: float, sy: float) -> np.ndarray:
    """Vertices (k, 2) of the polygonal shapes, in order (the cross: its 8 outer corners, unordered)."""
    if shape in ("square", "rectangle"):
        return np.array([(-sx, -sy), (sx, -sy), (sx, sy), (-sx, sy)])
    if shape == "triangle":
        return np.array([(-sx, -sy), (sx, -sy), (0.0, sy)])
    if shape == "pentagon":
        mid = (2.0 * GOLDEN - 1.0) * sy
        return np.array([(-GOLDEN * sx, -sy), (GOLDEN * sx, -sy), (sx, mid), (0.0, sy), (-sx, mid)])
    if shape == "cross":
        arms = ((sx, sy / 3), (sx / 3, sy))
        return np.array([(dx * ax, dy * ay) for ax, ay in arms for dx in (-1, 1) for dy in (-1, 1)])
    raise ValueError(f"{shape} is not a polygon")


def _inside_convex(vertices: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Points (x, y) on the inner side of every edge of a convex polygon (either winding)."""
    following = np.roll(vertices, -1, axis=0)
    edges = following - vertices
    orientation = np.sign(np.sum(vertices[:, 0] * following[:, 1] - following[:, 0] * vertices[:, 1]))
    inside = np.ones(x.shape, dtype=bool)
    for (ax, ay), (ex, ey) in zip(vertices, edges):
        inside &= orientation * (ex * (y - ay) - ey * (x - ax)) >= 0.0
    return inside


def _inside_local(shape: str, sx: float, sy: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if shape in ("square", "rectangle"):
        return (np.abs(x) <= sx) & (np.abs(y) <= sy)
    if shape == "cross":
        ax, ay = np.abs(x), np.abs(y)
        return ((ax <= sx) & (ay <= sy / 3)) | ((ax <= sx / 3) & (ay <= sy))
    if shape == "circle":
        return x * x + y * y <= sx * sx
    if shape == "ellipse":
        return (x / sx) ** 2 + (y / sy) ** 2 <= 1.0
    if shape == "semicircle":  # the half disc of radius sx centred at (0, -sy), on its +y side
        return (x * x + (y + sy) ** 2 <= sx * sx) & (y >= -sy)
    return _inside_convex(_polygon(shape, sx, sy), x, y)


def shape_mask(shape: str, half_size: tuple[float, float], rotation: float, center: tuple[float, float],
               image_size: int) -> np.ndarray:
    """Boolean [image_size, image_size] mask of the pixels whose centre lies in the shape.
    ``half_size`` and ``center`` are fractions of the image side."""
    coords = (np.arange(image_size) + 0.5) / image_size
    dx = coords[None, :] - center[0]
    dy = coords[:, None] - center[1]
    cos, sin = math.cos(2 * math.pi * rotation), math.sin(2 * math.pi * rotation)
    return _inside_local(shape, *half_size, cos * dx + sin * dy, cos * dy - sin * dx)


def shape_bbox(shape: str, half_size: tuple[float, float], rotation: float, center: tuple[float, float]) -> Box:
    """The exact axis-aligned box (x1, y1, x2, y2) of the rotated shape."""
    sx, sy = half_size
    t = 2 * math.pi * rotation
    cos, sin = math.cos(t), math.sin(t)
    if shape == "circle":
        hx = hy = sx
        low, high = (-hx, -hy), (hx, hy)
    elif shape == "ellipse":
        hx, hy = math.hypot(sx * cos, sy * sin), math.hypot(sx * sin, sy * cos)
        low, high = (-hx, -hy), (hx, hy)
    else:
        if shape == "semicircle":  # chord ends, plus the arc points where it is extreme in x or y
            disc = np.array([sy * sin, -sy * cos])  # the rotated disc centre (0, -sy)
            angles = [(k * math.pi / 2 - t) % (2 * math.pi) for k in range(4)]
            arc = [disc + sx * np.array([math.cos(a + t), math.sin(a + t)]) for a in angles if a <= math.pi]
            local = np.array([(-sx, -sy), (sx, -sy)])
            points = np.vstack([local @ np.array([[cos, sin], [-sin, cos]])] + arc)
        else:
            points = _polygon(shape, sx, sy) @ np.array([[cos, sin], [-sin, cos]])
        low, high = points.min(axis=0), points.max(axis=0)
    return (center[0] + low[0], center[1] + low[1], center[0] + high[0], center[1] + high[1])


def shaded_rgb(color: str, shade: float) -> tuple[int, int, int]:
    """The drawn 8-bit colour: shade > 0 moves the base colour toward white,
    shade < 0 toward black, by that fraction (as ShapeWorld, truncated to 8 bits)."""
    base = np.array(COLORS[color])
    rgb = base + (1.0 - base) * shade if shade > 0 else base * (1.0 + shade)
    return tuple(int(v) for v in np.floor(rgb * 255.0 + 1e-9))


# ----------------------------------------------------------------------------- writing

def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _check_options(seed: int, image_size: int, **counts: int) -> None:
    """OptionError for a count below 1, a negative seed or an image too small or too large to draw."""
    check_at_least(1, **counts)
    check_at_least(0, seed=seed)
    if image_size < MIN_IMAGE_SIZE:
        raise OptionError(f"--image-size {image_size}: too small to draw the shapes (use {MIN_IMAGE_SIZE} or more)")
    if image_size > MAX_IMAGE_SIZE:
        raise OptionError(f"--image-size {image_size}: too large to draw in memory, and no model here takes "
                          f"more than 3584 px a side (use {MAX_IMAGE_SIZE} or less)")


def _data_there(out: Path, what: str, delete: Path) -> OptionError:
    """Generating over an earlier data set would leave its files that the new run does not write (a shard,
    an image) beside the new ones: a silently mixed data set."""
    return OptionError(f"--out {out}: already holds {what}; choose an empty folder or delete {delete} first "
                       "(generating over it would mix two data sets)")


def _check_no_shards(out: Path) -> None:
    """OptionError when ``out`` already holds shard folders (finished or not)."""
    there = sorted(p.name for p in out.glob("shard*") if p.is_dir() and re.fullmatch(r"shard\d+", p.name))
    if there:
        raise _data_there(out, f"shard folders ({', '.join(there[:3])}{', ...' if len(there) > 3 else ''})", out)


def _check_corners_not_generated(out: Path, corners: Sequence[str]) -> None:
    """OptionError when a corner to write already has a finished folder. One without metadata.jsonl (written
    last) is an interrupted run and is completed in place, as run_corner_experiments.sh asks for: nothing
    reads an image that metadata.jsonl does not name."""
    for corner in corners:
        folder = out / f"dataset_{corner}"
        if (folder / "metadata.jsonl").exists():
            raise _data_there(out, f"dataset_{corner}/metadata.jsonl", folder)


# ----------------------------------------------------------------------------- ShapeWorld

def _random_entity(shape: str, rng: np.random.Generator) -> dict:
    """A shape's random attributes; ``_place`` gives it a centre."""
    color = list(COLORS)[rng.integers(len(COLORS))]
    return {"shape": shape, "size": sample_half_size(shape, rng), "color": color,
            "shade": float(rng.uniform(-SHADE_RANGE, SHADE_RANGE)), "rotation": float(rng.random())}


def _place(subject: dict, obj: dict, relation: str, gap: float, rng: np.random.Generator) -> bool:
    """Give both entities a centre inside the image such that their boxes are
    apart by ``gap`` along the relation's axis in the relation's direction
    (so the relation holds on centres and on pixels); False if no luck."""
    first, second = (subject, obj) if relation in ("left", "above") else (obj, subject)
    axis = 0 if relation in ("left", "right") else 1
    first_box, second_box = (shape_bbox(e["shape"], e["size"], e["rotation"], (0.0, 0.0)) for e in (first, second))
    for _ in range(100):
        for entity, (x1, y1, x2, y2) in ((first, first_box), (second, second_box)):
            entity["center"] = (rng.uniform(-x1, 1.0 - x2), rng.uniform(-y1, 1.0 - y2))
        if first["center"][axis] + first_box[axis + 2] + gap <= second["center"][axis] + second_box[axis]:
            return True
    return False


def _entity_json(entity: dict, entity_id: int) -> dict:
    x1, y1, x2, y2 = shape_bbox(entity["shape"], entity["size"], entity["rotation"], entity["center"])
    return {
        "bounding_box": {"bottomright": {"x": x2, "y": y2}, "topleft": {"x": x1, "y": y1}},
        "center": {"x": entity["center"][0], "y": entity["center"][1]},
        "color": {"name": entity["color"], "rgb": list(COLORS[entity["color"]]), "shade": entity["shade"]},
        "id": entity_id,
        "rotation": entity["rotation"],
        "shape": {"name": entity["shape"], "size": {"x": entity["size"][0], "y": entity["size"][1]}},
        "texture": {"name": "solid"},
    }


def _draw(entities: Sequence[dict], image_size: int, background: tuple[int, int, int]) -> np.ndarray:
    pixels = np.empty((image_size, image_size, 3), dtype=np.uint8)
    pixels[:] = background
    for entity in entities:
        mask = shape_mask(entity["shape"], entity["size"], entity["rotation"], entity["center"], image_size)
        pixels[mask] = shaded_rgb(entity["color"], entity["shade"])
    return pixels


def random_scene(rng: np.random.Generator, image_size: int) -> tuple[dict, dict, str, list[dict]]:
    """One two-shape world's entities: (first-mentioned, second, relation from the first to the second,
    both in list order); centres and boxes are fractions of the image side."""
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    while True:
        first_shape, second_shape = (SHAPES[k] for k in rng.choice(len(SHAPES), size=2, replace=False))
        subject, obj = _random_entity(first_shape, rng), _random_entity(second_shape, rng)
        if _place(subject, obj, relation, 2.0 / image_size, rng):
            break
    ordered = [obj, subject] if rng.random() < 0.5 else [subject, obj]  # list order is not caption order
    return subject, obj, relation, ordered


def draw_scene(entities: Sequence[dict], image_size: int) -> np.ndarray:
    """A ShapeWorld picture of ``entities`` (black background), (size, size, 3) uint8."""
    return _draw(entities, image_size, (0, 0, 0))


def _random_world(rng: np.random.Generator, image_size: int) -> tuple[str, dict, bytes]:
    """(caption, world_model element, PNG bytes) of one two-shape world."""
    subject, obj, relation, ordered = random_scene(rng, image_size)
    caption = format_caption(subject["color"], subject["shape"], obj["color"], obj["shape"], relation)
    model = {"color": {"name": "black", "rgb": [0.0, 0.0, 0.0], "shade": 0.0},
             "entities": [_entity_json(e, k) for k, e in enumerate(ordered)],
             "meta": {}, "size": image_size}
    return caption, model, _png_bytes(draw_scene(ordered, image_size))


def generate_shapeworld(out: Path, shards: int = 5, worlds_per_shard: int = 100, seed: int = 0,
                        image_size: int = 100) -> Path:
    """Write ``out/shard{k}/`` for k < shards, each with ``worlds_per_shard``
    worlds; every caption true (agreement 1.0). Shard k depends only on
    (seed, k). Refuses a folder that already holds shards. Returns ``out``."""
    _check_options(seed, image_size, shards=shards, worlds_per_shard=worlds_per_shard)
    out = Path(out)
    _check_no_shards(out)
    for shard in range(shards):
        rng = np.random.default_rng([seed, shard])
        shard_dir = out / f"shard{shard}"
        captions, models = [], []
        for index in range(worlds_per_shard):
            caption, model, png = _random_world(rng, image_size)
            write_atomic(shard_dir / f"world-{index}.png", png)
            captions.append(caption)
            models.append(model)
        write_atomic(shard_dir / "caption.txt", "".join(c + "\n" for c in captions))
        write_atomic(shard_dir / "agreement.txt", "1.0\n" * worlds_per_shard)
        write_atomic(shard_dir / "world_model.json", json.dumps(models, indent=2, sort_keys=True) + "\n")
        log.info("wrote %s (%d worlds)", shard_dir, worlds_per_shard)
    return out


# ----------------------------------------------------------------------------- counterfactual pairs

def _pixel_box(shape: str, half_size: tuple[float, float], center: tuple[float, float], image_size: int) -> list[int]:
    """[x1, y1, x2, y2] in pixels, x2/y2 exclusive (PIL crop convention), around every drawn pixel."""
    x1, y1, x2, y2 = shape_bbox(shape, half_size, 0.0, center)
    return [math.floor(x1 * image_size), math.floor(y1 * image_size),
            math.ceil(x2 * image_size), math.ceil(y2 * image_size)]


def corner_pair(rng: np.random.Generator, corner: str, image_size: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """One counterfactual pair: the subject in ``corner``'s cell of a 3x3 grid, the object in the opposite
    corner's cell. Returns (caption, relation, shapes, colours and pixel boxes as metadata.jsonl writes them;
    the full picture; the control picture, the same without the subject)."""
    margin = image_size / 16
    cell = (image_size - 2 * margin) / 3
    row, col = (0 if corner.startswith("top") else 2), (0 if corner.endswith("left") else 2)
    cells = {"subject": (row, col), "object": (2 - row, 2 - col)}
    shapes = [SHAPES[k] for k in rng.choice(len(SHAPES), size=2, replace=False)]
    entities = {}
    for role, shape in zip(("subject", "object"), shapes):
        r, c = cells[role]
        size = sample_half_size(shape, rng, (0.3 * cell / image_size, 0.42 * cell / image_size))
        center = ((margin + (c + 0.5) * cell) / image_size, (margin + (r + 0.5) * cell) / image_size)
        entities[role] = {"shape": shape, "size": size, "rotation": 0.0, "center": center, "shade": 0.0,
                          "color": list(COLORS)[rng.integers(len(COLORS))]}
    subject, obj = entities["subject"], entities["object"]
    words = CORNER_WORDS[corner].replace("top", "upper").replace("bottom", "lower")
    record = {
        "caption": f"a {subject['color']} {subject['shape']} is to the {words} of a {obj['color']} {obj['shape']}",
        "relation": RELATION_OF_CORNER[corner],
        "subject_shape": subject["shape"], "object_shape": obj["shape"],
        "subject_color": subject["color"], "object_color": obj["color"],
        "bounding_boxes": {role: _pixel_box(e["shape"], e["size"], e["center"], image_size)
                           for role, e in entities.items()},
    }
    return (record, _draw([obj, subject], image_size, BACKGROUND_LIGHT),
            _draw([obj], image_size, BACKGROUND_LIGHT))


def generate_counterfactual(out: Path, count: int = 100, image_size: int = 64, seed: int = 7,
                            corners: Sequence[str] = CORNERS) -> list[Path]:
    """Write ``out/dataset_{corner}/`` for each corner: ``count`` pairs of a full
    image (subject in the corner cell of a 3x3 grid, object in the opposite
    corner cell) and its control (the subject removed), plus metadata.jsonl.
    A corner's folder depends only on (seed, corner); one that is already
    finished (has metadata.jsonl) is refused. Returns the folders."""
    _check_options(seed, image_size, count=count)
    unknown = [c for c in corners if c not in CORNERS]
    if unknown or not corners:
        raise OptionError(f"--corners {','.join(corners)!r}: choose from {', '.join(CORNERS)}")
    _check_corners_not_generated(Path(out), corners)
    folders = []
    for corner in corners:
        rng = np.random.default_rng([seed, CORNERS.index(corner)])
        folder = Path(out) / f"dataset_{corner}"
        lines = []
        for index in range(count):
            record, full_pixels, control_pixels = corner_pair(rng, corner, image_size)
            name = f"pair_{index:05d}"
            full, control = f"images/{name}_full.png", f"images/{name}_control.png"
            write_atomic(folder / full, _png_bytes(full_pixels))
            write_atomic(folder / control, _png_bytes(control_pixels))
            boxes = record.pop("bounding_boxes")  # written after the image names, as before
            lines.append(json.dumps({"id": index, **record, "full_image": full, "control_image": control,
                                     "bounding_boxes": boxes,
                                     "note": "control = full image with the subject removed; the object is "
                                             "pixel-identical",
                                     "corner": corner, "image_size": image_size, "seed": seed}))
        write_atomic(folder / "metadata.jsonl", "".join(line + "\n" for line in lines))
        log.info("wrote %s (%d pairs)", folder, count)
        folders.append(folder)
    return folders


def shapeworld_folder(path: Path, seed: int = 0) -> Path:
    """``path`` itself; the default folder (``DEFAULT_SHAPEWORLD``) is generated first when it is
    missing. ``DataError`` when ``path`` is a file or another missing folder: said before a model loads."""
    if path.exists():
        list_shards(path)  # the reader's own check: a file is not a ShapeWorld folder
        return path
    if Path(path) != DEFAULT_SHAPEWORLD:
        raise DataError(f"--data {path}: folder does not exist (point it at a ShapeWorld agreement/relational "
                        f"folder, or generate one with: python generate_data.py shapeworld --out {path})")
    log.warning("NOTICE: %s does not exist; generating 5 x 100 ShapeWorld-format worlds there (seed %d). "
                "For the paper's data, put real ShapeWorld output in that folder.", path, seed)
    generate_shapeworld(path, seed=seed)
    return path


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "generate_data.py",
        "Generate the study's data sets offline (see data/README.md).\n\n"
        "  shapeworld      two-shape worlds in ShapeWorld's agreement/relational format\n"
        "  counterfactual  fixed-position full/control image pairs, one folder per corner\n\n"
        "Same options -> identical files. Generated data is git-ignored.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{shapeworld,counterfactual}")

    shapeworld = commands.add_parser(
        "shapeworld", formatter_class=HelpFormatter, parents=[common],
        help="ShapeWorld-format worlds (shardK/world-I.png, caption.txt, agreement.txt, world_model.json)",
        description="Write OUT/shard{k}/ folders that read exactly like real ShapeWorld agreement/relational\n"
                    "output (spatial_twoshapes): one caption per world, all true, relations left/right/above/\n"
                    "below, the two shapes apart along the relation's axis, exact bounding boxes.")
    shapeworld.add_argument("--out", type=Path, required=True, default=argparse.SUPPRESS,
                            help="output folder, e.g. data/spatial_twoshapes/agreement/relational")
    shapeworld.add_argument("--shards", type=int, default=5, help="number of shard folders")
    shapeworld.add_argument("--worlds-per-shard", type=int, default=100, help="worlds in each shard")
    shapeworld.add_argument("--seed", type=int, default=0, help="random seed (shard k depends on seed and k only)")
    shapeworld.add_argument("--image-size", type=int, default=100, help="image side in pixels")

    pairs = commands.add_parser(
        "counterfactual", formatter_class=HelpFormatter, parents=[common],
        help="fixed-position pairs (OUT/dataset_{corner}/images/pair_NNNNN_{full,control}.png, metadata.jsonl)",
        description="Write OUT/dataset_{corner}/ for each corner: a full image with the subject in that\n"
                    "corner cell of a 3x3 grid and the object in the opposite corner cell, its control with\n"
                    "the subject removed (the object pixel-identical), and metadata.jsonl.")
    pairs.add_argument("--out", type=Path, required=True, default=argparse.SUPPRESS, help="output folder (e.g. data)")
    pairs.add_argument("--count", type=int, default=100, help="pairs per corner")
    pairs.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    pairs.add_argument("--seed", type=int, default=7, help="random seed (a corner depends on seed and corner only)")
    pairs.add_argument("--corners", default=",".join(CORNERS), help="comma-separated corners to write")
    return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.command == "shapeworld":
        generate_shapeworld(args.out, shards=args.shards, worlds_per_shard=args.worlds_per_shard,
                            seed=args.seed, image_size=args.image_size)
    else:
        corners = [c.strip() for c in args.corners.split(",") if c.strip()]
        generate_counterfactual(args.out, count=args.count, image_size=args.image_size, seed=args.seed,
                                corners=corners)
