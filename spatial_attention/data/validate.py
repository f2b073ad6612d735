"""The ShapeWorld folder checked against the data contract (``../shared/specs/shapeworld_format.md``): every
problem, one line each, instead of the reader's first one. Used by the tests and by anyone checking a download."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from spatial_attention.common.errors import DataError
from spatial_attention.data.shapeworld import (IMAGE_ERRORS, WORLD_SCHEMA, Entity, bind_mentions, box_problems,
                                               entity_problems, list_shards, parse_caption, read_agreements, read_lines,
                                               read_world_model, relation_holds, schema_problems)


def _image_problem(path: Path, side: int | None) -> str | None:
    try:
        with Image.open(path) as image:
            image.load()
            mode, (width, height) = image.mode, image.size
    except FileNotFoundError:
        return f"{path}: image file missing"
    except IMAGE_ERRORS as err:
        return f"{path}: cannot read the image ({err})"
    if mode != "RGB":
        return f"{path}: image mode {mode}, expected RGB"
    if width != height or (side is not None and width != side):
        expected = f"{side}x{side}" if side is not None else "square"
        return f"{path}: image is {width}x{height}, expected {expected}"
    return None


def _world_problems(shard_dir: Path, index: int, caption_text: str, agreement: float, world_json) -> list[str]:
    """Everything wrong with one world of a shard (validate_shapeworld's per-world part)."""
    where = f"{shard_dir / 'world_model.json'} world {index}"
    problems = []
    try:
        caption = parse_caption(caption_text)
    except DataError as err:
        problems.append(f"{shard_dir / 'caption.txt'} line {index + 1}: {err}")
        caption = None
    schema = schema_problems(world_json, WORLD_SCHEMA, "")
    problems += [f"{where}: {p}" for p in schema]
    side = world_json["size"] if not schema else None
    entities_ok = False
    if not schema:
        entities = world_json["entities"]
        entity_schema = [f"{where} entity {k}: {p}" for k, e in enumerate(entities) for p in entity_problems(e)]
        problems += entity_schema
        if len(entities) != 2:
            problems.append(f"{where}: {len(entities)} entities (expected 2)")
        elif not entity_schema:
            entities_ok = True
            pair = [Entity.from_json(e) for e in entities]
            if pair[0].shape == pair[1].shape:
                problems.append(f"{where}: both entities are a {pair[0].shape} (ShapeWorld requires different shapes)")
            problems += [message for _, message in box_problems(pair, where)]
            for k, e in enumerate(pair):
                x1, y1, x2, y2 = e.bbox
                if not (x1 <= e.center[0] <= x2 and y1 <= e.center[1] <= y2):
                    problems.append(f"{where} entity {k}: centre {e.center} lies outside its bounding box {e.bbox}")
    if caption is not None and entities_ok and agreement == 1.0:
        try:
            subject, obj = bind_mentions(caption, world_json["entities"])
        except DataError as err:
            problems.append(f"{where}: {err}")
        else:
            for mention, (color, entity) in enumerate(((caption.color1, subject), (caption.color2, obj)), start=1):
                if entity.color != color:
                    problems.append(f"{where}: mention {mention} says {color} {entity.shape} but the entity is "
                                    f"{entity.color}")
            if not relation_holds(caption.relation, subject, obj):
                problems.append(f"{where}: caption says '{caption.relation}' (agreement 1.0) but the centres "
                                f"{subject.center} and {obj.center} disagree")
    image_problem = _image_problem(shard_dir / f"world-{index}.png", side)
    if image_problem:
        problems.append(image_problem)
    return problems


def validate_shapeworld(root: Path) -> list[str]:
    """Every problem found in a ShapeWorld folder, one line each; empty = valid.

    Checks the layout, that every caption is in the grammar, that agreement
    values parse, the world_model.json schema, exactly two entities of
    different shapes per world, boxes with some area inside the image, centres
    inside their boxes, that captions with agreement 1.0 bind and are true of
    the centres, and that every image is a readable square RGB picture of the
    world's size.
    """
    root = Path(root)
    try:
        shards = list_shards(root)
    except DataError as err:
        return [str(err)]
    if not shards:
        return [f"{root}: no shardN folders"]
    problems = []
    for shard in shards:
        shard_dir = root / f"shard{shard}"
        try:
            captions = read_lines(shard_dir / "caption.txt")
            agreements = read_agreements(shard_dir / "agreement.txt")
            worlds = read_world_model(shard_dir / "world_model.json")
        except DataError as err:
            problems.append(str(err))
            continue
        if not len(captions) == len(agreements) == len(worlds):
            problems.append(f"{shard_dir}: {len(captions)} captions, {len(agreements)} agreement values and "
                            f"{len(worlds)} world_model.json elements; the counts must be equal")
        for index, (caption_text, agreement, world_json) in enumerate(zip(captions, agreements, worlds)):
            problems += _world_problems(shard_dir, index, caption_text, agreement, world_json)
    return problems
