"""Reader for ShapeWorld ``agreement/relational`` data (``spatial_twoshapes``).

The data contract is shapeworld_format.md in the shared specs. In short: each
``shardN/`` folder holds ``world-{i}.png``, ``caption.txt`` (line i describes
world i), ``agreement.txt`` (1.0 = the caption is true) and ``world_model.json``
(element i lists world i's two entities). Captions follow one fixed grammar:

    there are two shapes a {color1} {shape1} and a {color2} {shape2} . what is the
    spatial relationship from the first shape to the second shape ? the spatial
    relation is {rel} .

The trap: ``entities`` in world_model.json are NOT in caption order (entity 0 is
the first-mentioned shape in only about half the worlds), so mentions are bound
to entities by their attributes, never by list position.

Problems with a whole shard (missing files, count mismatches, broken JSON)
raise ``DataError``; problems with one world (caption outside the grammar, not
two entities, a box with no area inside the image, unbindable mentions, missing
image) are reported as ``Skipped`` records, or raised with ``strict=True``.
Every message is one line that names the file and, where it applies, the line
or world index; quoted input is cut short (``errors.quote``).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from PIL import Image

from spatial_attention.common.errors import DataError, input_folder, quote
from spatial_attention.stats.metrics import box_problem, clip_box

SHAPES = ("square", "rectangle", "triangle", "pentagon", "cross", "circle", "semicircle", "ellipse")
COLORS = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
    "gray": (0.5, 0.5, 0.5),
}
RELATIONS = ("left", "right", "above", "below")
# where the experiments look for ShapeWorld output when --data is not given
DEFAULT_SHAPEWORLD = Path("data/spatial_twoshapes/agreement/relational")
RELATION_AXIS = {"left": "x", "right": "x", "above": "y", "below": "y"}
FLIPPED_RELATION = {"left": "right", "right": "left", "above": "below", "below": "above"}

# Generic words first, vocabulary checked afterwards, so that a message can say
# which word is unknown instead of only "outside the grammar".
_CAPTION_RE = re.compile(
    r"there are two shapes (?P<article1>an?) (?P<color1>[a-z]+) (?P<shape1>[a-z]+)"
    r" and (?P<article2>an?) (?P<color2>[a-z]+) (?P<shape2>[a-z]+) \."
    r" what is the spatial relationship from the first shape to the second shape \?"
    r" the spatial relation is (?P<relation>[a-z]+) \.")
_SHARD_RE = re.compile(r"shard(\d+)")


# ----------------------------------------------------------------------------- captions

@dataclass(frozen=True)
class Caption:
    """A parsed caption: mention 1 is the subject, mention 2 the object, and
    ``relation`` goes from the subject to the object."""
    color1: str
    shape1: str
    color2: str
    shape2: str
    relation: str
    text: str

    def spans(self) -> dict[str, tuple[int, int]]:
        """Character spans (start, end) in ``text`` of shape1, color1, phrase1
        ("a cyan ellipse"), the same for mention 2, and the relation word."""
        match = _CAPTION_RE.fullmatch(self.text)
        if match is None:
            raise DataError(f"caption outside the ShapeWorld grammar: {quote(self.text)}")
        spans = {key: match.span(key) for key in ("color1", "shape1", "color2", "shape2", "relation")}
        spans["phrase1"] = (match.start("article1"), match.end("shape1"))
        spans["phrase2"] = (match.start("article2"), match.end("shape2"))
        return spans


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def format_caption(color1: str, shape1: str, color2: str, shape2: str, relation: str) -> str:
    """The caption text exactly as ShapeWorld writes it."""
    return (f"there are two shapes {_article(color1)} {color1} {shape1} and {_article(color2)} {color2} {shape2} ."
            f" what is the spatial relationship from the first shape to the second shape ?"
            f" the spatial relation is {relation} .")


def parse_caption(text: str) -> Caption:
    """Parse one caption line; ``DataError`` quoting it when it is outside the grammar."""
    match = _CAPTION_RE.fullmatch(text)
    if match is None:
        raise DataError(f"caption outside the ShapeWorld grammar: {quote(text)}")
    words = match.groupdict()
    for key, vocabulary, kind in (("color1", COLORS, "colour"), ("color2", COLORS, "colour"),
                                  ("shape1", SHAPES, "shape"), ("shape2", SHAPES, "shape"),
                                  ("relation", RELATIONS, "relation")):
        if words[key] not in vocabulary:
            raise DataError(f"unknown {kind} {quote(words[key], limit=30)} (expected one of {', '.join(vocabulary)}) "
                            f"in caption {quote(text)}")
    return Caption(words["color1"], words["shape1"], words["color2"], words["shape2"], words["relation"], text)


def counterfactual_caption(caption: Caption) -> Caption:
    """The same fact told the other way round: the two entity phrases swapped and
    the relation flipped ("a blue circle and a cyan ellipse ... right")."""
    text = format_caption(caption.color2, caption.shape2, caption.color1, caption.shape1,
                          FLIPPED_RELATION[caption.relation])
    return parse_caption(text)


# ----------------------------------------------------------------------------- entities

# world_model.json schema as in real ShapeWorld output; float accepts ints too.
_ENTITY_SCHEMA = {
    "id": int,
    "shape": {"name": str, "size": {"x": float, "y": float}},
    "color": {"name": str, "rgb": "rgb", "shade": float},
    "texture": {"name": str},
    "rotation": float,
    "center": {"x": float, "y": float},
    "bounding_box": {"topleft": {"x": float, "y": float}, "bottomright": {"x": float, "y": float}},
}
WORLD_SCHEMA = {"color": {"name": str, "rgb": "rgb", "shade": float}, "size": int, "meta": dict, "entities": list}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def schema_problems(value, schema, where: str) -> list[str]:
    """Missing keys and wrong types of ``value`` against ``schema`` (extra keys are fine)."""
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{where or 'value'} should be an object, got {type(value).__name__}"]
        problems = []
        for key, sub in schema.items():
            path = f"{where}.{key}" if where else key
            if key not in value:
                problems.append(f"missing key {path!r}")
            else:
                problems += schema_problems(value[key], sub, path)
        return problems
    if schema == "rgb":
        ok = isinstance(value, list) and len(value) == 3 and all(_is_number(v) for v in value)
        return [] if ok else [f"{where!r} should be a list of 3 numbers, got {quote(value)}"]
    if schema is float:
        return [] if _is_number(value) else [f"{where!r} should be a number, got {quote(value)}"]
    if schema is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{where!r} should be an integer, got {quote(value)}"]
    return [] if isinstance(value, schema) else [f"{where!r} should be a {schema.__name__}, got {quote(value)}"]


def entity_problems(entity_json) -> list[str]:
    """Schema problems of one world_model.json entity, plus unknown shape or colour names."""
    problems = schema_problems(entity_json, _ENTITY_SCHEMA, "")
    if problems:
        return problems
    if entity_json["shape"]["name"] not in SHAPES:
        problems.append(f"unknown shape {quote(entity_json['shape']['name'])}")
    if entity_json["color"]["name"] not in COLORS:
        problems.append(f"unknown colour {quote(entity_json['color']['name'])}")
    return problems


@dataclass(frozen=True)
class Entity:
    """One shape of a world, in normalised image coordinates (fractions of the
    image side, origin top-left, y downward) exactly as world_model.json gives
    them: ``bbox`` = (x1, y1, x2, y2), raw, it may stick out of [0, 1] a little."""
    shape: str
    color: str
    shade: float
    rotation: float
    center: tuple[float, float]
    bbox: tuple[float, float, float, float]
    size: tuple[float, float] | None = None  # half-extents (shape.size x, y)

    @classmethod
    def from_json(cls, entity_json: Mapping) -> "Entity":
        """Build from a world_model.json entity; ``DataError`` on the first schema problem."""
        problems = entity_problems(entity_json)
        if problems:
            raise DataError(problems[0])
        box = entity_json["bounding_box"]
        return cls(shape=entity_json["shape"]["name"], color=entity_json["color"]["name"],
                   shade=float(entity_json["color"]["shade"]), rotation=float(entity_json["rotation"]),
                   center=(float(entity_json["center"]["x"]), float(entity_json["center"]["y"])),
                   bbox=(float(box["topleft"]["x"]), float(box["topleft"]["y"]),
                         float(box["bottomright"]["x"]), float(box["bottomright"]["y"])),
                   size=(float(entity_json["shape"]["size"]["x"]), float(entity_json["shape"]["size"]["y"])))

    def clipped_bbox(self) -> tuple[float, float, float, float]:
        """``bbox`` clipped to [0, 1], ready to map onto image patches."""
        return clip_box(self.bbox)


def bind_mentions(caption: Caption, entities_json: Sequence[Mapping]) -> tuple[Entity, Entity]:
    """(subject, object): the entities the caption's first and second mentions
    name, matched on shape name, and on colour too where the shape names are
    equal. Never by list position. ``DataError`` when not two entities, or when
    a mention matches no entity or cannot be told apart."""
    if len(entities_json) != 2:
        raise DataError(f"{len(entities_json)} entities (expected 2)")
    entities = []
    for k, entity_json in enumerate(entities_json):
        try:
            entities.append(Entity.from_json(entity_json))
        except DataError as err:
            raise DataError(f"entity {k}: {err}") from None
    bound = []
    for color, shape in ((caption.color1, caption.shape1), (caption.color2, caption.shape2)):
        matches = [e for e in entities if e.shape == shape]
        if len(matches) > 1:
            matches = [e for e in matches if e.color == color]
        if not matches:
            raise DataError(f"no entity matches the mention '{color} {shape}' "
                            f"(entities: {', '.join(f'{e.color} {e.shape}' for e in entities)})")
        if len(matches) > 1:
            raise DataError(f"the mention '{color} {shape}' matches both entities")
        bound.append(matches[0])
    if bound[0] is bound[1]:
        raise DataError(f"both mentions bind to the same entity ({bound[0].color} {bound[0].shape})")
    return bound[0], bound[1]


def box_problems(entities: Sequence[Entity], where: str) -> list[tuple[str, str]]:
    """(kind, one-line message) for each entity whose box has no area inside the
    image (metrics.box_problem); such a box cannot be turned into a patch mask."""
    found = []
    for k, entity in enumerate(entities):
        problem = box_problem(entity.bbox)
        if problem is not None:
            kind, what = problem
            found.append((kind, f"{where} entity {k} ({entity.color} {entity.shape}): "
                                f"bounding box {entity.bbox} {what}"))
    return found


def relation_holds(relation: str, subject: Entity, object: Entity) -> bool:
    """Whether ``relation`` goes from subject to object on their centres
    (left = smaller x, above = smaller y; image y grows downward)."""
    (sx, sy), (ox, oy) = subject.center, object.center
    return {"left": sx < ox, "right": sx > ox, "above": sy < oy, "below": sy > oy}[relation]


# ----------------------------------------------------------------------------- worlds

@dataclass(frozen=True)
class World:
    """One usable world: the caption with its mentions bound to entities."""
    shard: int
    index: int
    image_path: Path
    caption: Caption
    agreement: float
    subject: Entity  # first-mentioned
    object: Entity  # second-mentioned

    def load_image(self) -> Image.Image:
        return load_rgb(self.image_path)


@dataclass(frozen=True)
class Skipped:
    """A world that could not be used. ``reason`` is the full one-line message
    (file, index, what is wrong); ``kind`` a short category to count by:
    caption, world_model, entities, empty_box, box_outside_image, binding or image."""
    shard: int
    index: int
    reason: str
    kind: str = "other"


@dataclass
class ReadStats:
    """Counts ``iter_worlds`` fills in as it goes, when given one: worlds listed
    in the shards read, worlds left out by the agreement filter (not Skipped,
    just not yielded), Skipped records and World objects yielded."""
    worlds: int = 0
    filtered: int = 0
    skipped: int = 0
    yielded: int = 0
    shards: list[int] = field(default_factory=list)


class _WorldProblem(DataError):
    """A one-world problem; ``kind`` becomes ``Skipped.kind``."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


# What PIL raises for a damaged or unreadable image; a corrupt header can also
# claim a huge size, which PIL refuses as a decompression bomb.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_rgb(path: Path) -> Image.Image:
    """An image file as an RGB PIL image; ``DataError`` naming the file if it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: image file missing") from None
    except IMAGE_ERRORS as err:
        raise DataError(f"{path}: cannot read the image ({err}); the file is damaged, re-download or "
                        "regenerate it") from None


def read_text(path: Path) -> str:
    """A UTF-8 text file's contents; ``DataError`` naming the file, and the line
    of the first bad byte, when it cannot be read or is not UTF-8."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read the file ({err.strerror or err}); "
                        "check that it is a readable file") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path} line {line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                        "save it as UTF-8, or re-download or regenerate it") from None


def list_shards(root: Path) -> list[int]:
    """Numbers of the ``shardN`` folders in ``root``, sorted numerically."""
    root = input_folder(root, "--data", "the agreement/relational folder that holds shard0, shard1, ...",
                        "ShapeWorld folder does not exist (point at an agreement/relational folder with "
                        f"shard0..shardK, or generate one with: python generate_data.py shapeworld --out {root})")
    numbers = [int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _SHARD_RE.fullmatch(p.name))]
    return sorted(numbers)


def _read_shard_file(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: missing (a shard needs caption.txt, agreement.txt and world_model.json); "
                        "re-download or regenerate the shard")
    return read_text(path)


def read_lines(path: Path) -> list[str]:
    return _read_shard_file(path).splitlines()


def read_world_model(path: Path) -> list:
    try:
        worlds = json.loads(_read_shard_file(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                        "the file is damaged, re-download or regenerate the shard") from None
    if not isinstance(worlds, list):
        raise DataError(f"{path}: expected a JSON list with one element per world, got {type(worlds).__name__}")
    return worlds


def read_agreements(path: Path) -> list[float]:
    values = []
    for number, line in enumerate(read_lines(path), start=1):
        try:
            values.append(float(line))
        except ValueError:
            raise DataError(f"{path} line {number}: {quote(line)} is not a number (expected 1.0 or 0.0)") from None
    return values


def read_shard(shard_dir: Path, agreement_only: bool) -> tuple[list[str], list[float], list]:
    """(captions, agreements, world_model elements) of one shard, checked to have equal counts."""
    captions = read_lines(shard_dir / "caption.txt")
    worlds = read_world_model(shard_dir / "world_model.json")
    if len(captions) != len(worlds):
        raise DataError(f"{shard_dir}: caption.txt has {len(captions)} captions but world_model.json describes "
                        f"{len(worlds)} worlds; the shard is incomplete or damaged")
    agreement_path = shard_dir / "agreement.txt"
    if agreement_path.exists() or agreement_only:
        if not agreement_path.exists():
            raise DataError(f"{agreement_path}: missing; it marks which captions are true (1.0). Restore it, or "
                            "read with the agreement filter off (agreement_only=False) to take every caption as true")
        agreements = read_agreements(agreement_path)
        if len(agreements) != len(captions):
            raise DataError(f"{agreement_path}: {len(agreements)} values for {len(captions)} captions; "
                            "the shard is incomplete or damaged")
    else:
        agreements = [1.0] * len(captions)
    return captions, agreements, worlds


def _build_world(shard: int, index: int, shard_dir: Path, caption_text: str, agreement: float,
                 world_json) -> World:
    """One World, or a ``_WorldProblem`` saying why not."""
    try:
        caption = parse_caption(caption_text)
    except DataError as err:
        raise _WorldProblem(f"{shard_dir / 'caption.txt'} line {index + 1}: {err}", "caption") from None
    model_where = f"{shard_dir / 'world_model.json'} world {index}"
    if not isinstance(world_json, dict) or not isinstance(world_json.get("entities"), list):
        raise _WorldProblem(f"{model_where}: expected an object with an 'entities' list", "world_model")
    entities = world_json["entities"]
    if len(entities) != 2:
        raise _WorldProblem(f"{model_where}: {len(entities)} entities (expected 2)", "entities")
    for k, entity_json in enumerate(entities):
        problems = entity_problems(entity_json)
        if problems:
            raise _WorldProblem(f"{model_where} entity {k}: {problems[0]}", "world_model")
    boxes = box_problems([Entity.from_json(e) for e in entities], model_where)
    if boxes:
        kind, message = boxes[0]
        raise _WorldProblem(message, kind)
    try:
        subject, obj = bind_mentions(caption, entities)
    except DataError as err:
        raise _WorldProblem(f"{model_where}: {err}", "binding") from None
    image_path = shard_dir / f"world-{index}.png"
    if not image_path.is_file():
        raise _WorldProblem(f"{image_path}: image file missing", "image")
    return World(shard, index, image_path, caption, agreement, subject, obj)


def iter_worlds(root: Path, shards: Sequence[int] | None = None, agreement_only: bool = True,
                limit: int | None = None, strict: bool = False,
                stats: ReadStats | None = None) -> Iterator[World | Skipped]:
    """Worlds of ``root`` in (shard, index) order, as ``World`` or ``Skipped``.

    shards: shard numbers to read (default: every ``shardN`` folder present).
    agreement_only: keep only worlds whose caption is true (agreement 1.0).
    limit: stop after this many ``World`` objects.
    strict: raise ``DataError`` instead of yielding ``Skipped``.
    stats: a ``ReadStats`` to fill in (how many were filtered out, skipped, ...).
    """
    root = Path(root)
    present = list_shards(root)
    if shards is None:
        if not present:
            raise DataError(f"{root}: no shardN folders (expected shard0, shard1, ... from ShapeWorld's "
                            f"agreement/relational output, or: python generate_data.py shapeworld --out {root})")
        shards = present
    else:
        missing = [s for s in shards if s not in present]
        if missing:
            raise DataError(f"{root}: shard folder shard{missing[0]} does not exist (present: "
                            f"{', '.join(f'shard{s}' for s in present) or 'none'})")
    stats = stats if stats is not None else ReadStats()
    for shard in shards:
        shard_dir = root / f"shard{shard}"
        captions, agreements, worlds = read_shard(shard_dir, agreement_only)
        stats.shards.append(shard)
        for index, (caption_text, agreement, world_json) in enumerate(zip(captions, agreements, worlds)):
            stats.worlds += 1
            if agreement_only and agreement != 1.0:
                stats.filtered += 1
                continue
            try:
                world = _build_world(shard, index, shard_dir, caption_text, agreement, world_json)
            except _WorldProblem as problem:
                if strict:
                    raise
                stats.skipped += 1
                yield Skipped(shard, index, str(problem), problem.kind)
                continue
            stats.yielded += 1
            yield world
            if limit is not None and stats.yielded >= limit:
                return
