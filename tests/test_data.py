"""Data readers and generators: ShapeWorld format (generated and real), the
counterfactual pairs, and the one-line errors for broken inputs."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spatial_attention.common.errors import DataError, OptionError
from spatial_attention.data.counterfactual import CORNERS, REQUIRED_FIELDS, corner_prompt, read_pairs, validate_pairs
from spatial_attention.data.generate import generate_counterfactual, generate_shapeworld, shapeworld_folder
from spatial_attention.data.shapeworld import (COLORS, RELATIONS, SHAPES, Caption, Entity, ReadStats, Skipped, World,
                                               bind_mentions, counterfactual_caption, format_caption, iter_worlds,
                                               parse_caption, relation_holds)
from spatial_attention.data.validate import validate_shapeworld
from spatial_attention.stats.metrics import entity_mask

REPO = Path(__file__).resolve().parents[1]
SIZE = 100


@pytest.fixture(scope="module")
def shapeworld(tmp_path_factory) -> Path:
    """2 shards x 40 generated worlds."""
    return generate_shapeworld(tmp_path_factory.mktemp("sw"), shards=2, worlds_per_shard=40, seed=3, image_size=SIZE)


@pytest.fixture(scope="module")
def pairs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cf")
    generate_counterfactual(root, count=6, image_size=64, seed=7)
    return root


@pytest.fixture
def shard_copy(shapeworld, tmp_path) -> Path:
    """A writable copy of generated shard0, to break."""
    root = tmp_path / "relational"
    shutil.copytree(shapeworld / "shard0", root / "shard0")
    return root


def drawn_rgb(color: str, shade: float) -> np.ndarray:
    """The 8-bit colour ShapeWorld draws (written out again here, independent of the generator)."""
    base = np.array(COLORS[color])
    rgb = base + (1 - base) * shade if shade > 0 else base * (1 + shade)
    return np.floor(rgb * 255 + 1e-9).astype(int)


def load_model(shard_dir: Path) -> list:
    return json.loads((shard_dir / "world_model.json").read_text())


# ----------------------------------------------------------------------------- captions

def test_caption_roundtrip_spans_and_counterfactual():
    text = format_caption("cyan", "ellipse", "blue", "circle", "left")
    caption = parse_caption(text)
    assert caption == Caption("cyan", "ellipse", "blue", "circle", "left", text)
    words = {key: text[a:b] for key, (a, b) in caption.spans().items()}
    assert words == {"color1": "cyan", "shape1": "ellipse", "color2": "blue", "shape2": "circle",
                     "relation": "left", "phrase1": "a cyan ellipse", "phrase2": "a blue circle"}
    flipped = counterfactual_caption(caption)
    assert (flipped.color1, flipped.shape1, flipped.color2, flipped.shape2, flipped.relation) == \
           ("blue", "circle", "cyan", "ellipse", "right")
    assert counterfactual_caption(flipped) == caption
    assert parse_caption(text.replace("a cyan", "an cyan")).shape1 == "ellipse"  # `an?` accepted


@pytest.mark.parametrize("bad", ["hello world", format_caption("black", "square", "red", "circle", "left"),
                                 format_caption("red", "square", "red", "circle", "near"),
                                 format_caption("red", "square", "red", "circle", "left") + " "])
def test_caption_outside_grammar(bad):
    with pytest.raises(DataError) as err:
        parse_caption(bad)
    assert repr(bad) in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- ShapeWorld: validity and binding

def test_generated_shapeworld_is_valid(shapeworld):
    assert validate_shapeworld(shapeworld) == []
    stats = ReadStats()
    worlds = list(iter_worlds(shapeworld, stats=stats))
    assert all(isinstance(w, World) for w in worlds) and len(worlds) == 80
    assert (stats.worlds, stats.filtered, stats.skipped, stats.yielded, stats.shards) == (80, 0, 0, 80, [0, 1])
    assert set(w.caption.relation for w in worlds) == set(RELATIONS)
    assert [(w.shard, w.index) for w in worlds] == sorted((w.shard, w.index) for w in worlds)
    assert len(list(iter_worlds(shapeworld, shards=[1], limit=5))) == 5


def test_generated_format_matches_real_conventions(shapeworld):
    shard = shapeworld / "shard0"
    raw = (shard / "world_model.json").read_text()
    model = json.loads(raw)
    assert raw == json.dumps(model, indent=2, sort_keys=True) + "\n"  # real files: sorted keys, indent 2
    assert (shard / "agreement.txt").read_text() == "1.0\n" * 40
    entity = model[0]["entities"][0]
    assert list(entity) == ["bounding_box", "center", "color", "id", "rotation", "shape", "texture"]
    assert entity["color"]["rgb"] == list(COLORS[entity["color"]["name"]])
    everything = [e for world in load_model(shard) + load_model(shapeworld / "shard1") for e in world["entities"]]
    assert all(-0.4 <= e["color"]["shade"] <= 0.4 and 0 <= e["rotation"] < 1 for e in everything)
    assert all(0.05 <= e["shape"]["size"]["x"] <= 0.125 for e in everything)
    assert {e["shape"]["name"] for e in everything} <= set(SHAPES)


def test_real_sample_is_valid_and_binds_by_attributes(real_sample):
    assert validate_shapeworld(real_sample) == []
    worlds = list(iter_worlds(real_sample))
    assert len(worlds) == 16 and all(isinstance(w, World) for w in worlds)
    assert all(relation_holds(w.caption.relation, w.subject, w.object) for w in worlds)
    assert {w.caption.relation for w in worlds} == set(RELATIONS)
    model = load_model(real_sample / "shard0")
    not_first = sum(Entity.from_json(model[w.index]["entities"][0]) != w.subject for w in worlds)
    assert not_first == 9  # list position would get these 9 wrong
    assert worlds[0].load_image().size == (100, 100)
    assert all(entity_mask(e.bbox, (24, 24)).any() for w in worlds for e in (w.subject, w.object))


def test_bind_mentions_uses_colour_when_shapes_are_equal():
    def entity(color, x):
        return {"id": 0, "shape": {"name": "square", "size": {"x": 0.1, "y": 0.1}},
                "color": {"name": color, "rgb": list(COLORS[color]), "shade": 0.0}, "texture": {"name": "solid"},
                "rotation": 0.0, "center": {"x": x, "y": 0.5},
                "bounding_box": {"topleft": {"x": x - 0.1, "y": 0.4}, "bottomright": {"x": x + 0.1, "y": 0.6}}}

    caption = parse_caption(format_caption("red", "square", "blue", "square", "right"))
    subject, obj = bind_mentions(caption, [entity("blue", 0.2), entity("red", 0.8)])
    assert (subject.color, obj.color) == ("red", "blue") and relation_holds("right", subject, obj)
    with pytest.raises(DataError, match="matches both"):
        bind_mentions(caption, [entity("red", 0.2), entity("red", 0.8)])
    with pytest.raises(DataError, match="no entity matches"):
        bind_mentions(parse_caption(format_caption("red", "circle", "blue", "square", "left")),
                      [entity("blue", 0.2), entity("red", 0.8)])
    clipped = Entity("square", "red", 0.0, 0.0, (0.0, 0.5), (-0.0034, 0.4, 0.1, 1.02)).clipped_bbox()
    assert clipped == (0.0, 0.4, 0.1, 1.0)


# ----------------------------------------------------------------------------- ShapeWorld: generated pictures

def test_generated_captions_agree_with_drawn_pixels(shapeworld):
    """Every drawn pixel lies in an entity's box (1 px slack) and has that entity's
    colour; the caption's relation holds on the centres and on the pixel centroids."""
    swapped = 0
    for world in iter_worlds(shapeworld):
        pixels = np.asarray(world.load_image()).astype(int)
        entities = load_model(shapeworld / f"shard{world.shard}")[world.index]["entities"]
        swapped += Entity.from_json(entities[0]) != world.subject
        ys, xs = np.nonzero(pixels.sum(axis=2))
        owner = np.full(len(xs), -1)
        centroids = {}
        for k, entity in enumerate((world.subject, world.object)):
            x1, y1, x2, y2 = (v * SIZE for v in entity.bbox)
            inside = (xs + 0.5 >= x1 - 1) & (xs + 0.5 <= x2 + 1) & (ys + 0.5 >= y1 - 1) & (ys + 0.5 <= y2 + 1)
            assert not (inside & (owner >= 0)).any(), "boxes overlap"
            owner[inside] = k
            assert inside.sum() > 0
            assert (pixels[ys[inside], xs[inside]] == drawn_rgb(entity.color, entity.shade)).all()
            centroids[k] = ((xs[inside].mean() + 0.5) / SIZE, (ys[inside].mean() + 0.5) / SIZE)
        assert (owner >= 0).all(), f"{world.image_path}: drawn pixels outside both boxes"
        assert relation_holds(world.caption.relation, world.subject, world.object)
        from_pixels = [Entity("", "", 0.0, 0.0, centroids[k], (0, 0, 1, 1)) for k in (0, 1)]
        assert relation_holds(world.caption.relation, *from_pixels), world.image_path
    assert 20 <= swapped <= 60  # list order independent of caption order (seeded coin)


def test_same_seed_same_bytes(tmp_path):
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        generate_shapeworld(tmp_path / name / "sw", shards=1, worlds_per_shard=5, seed=seed)
        generate_counterfactual(tmp_path / name / "cf", count=3, seed=seed, corners=["topleft"])
    a, b, c = (files(tmp_path / name) for name in "abc")
    assert a == b and len(a) == 5 + 3 + 2 * 3 + 1
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a if k.endswith(".png"))
    assert not any(name.endswith(".tmp") for name in a)


# ----------------------------------------------------------------------------- counterfactual pairs

def test_generated_pairs(pairs_root):
    for corner in CORNERS:
        folder = pairs_root / f"dataset_{corner}"
        assert validate_pairs(folder) == []
        pairs = read_pairs(folder)
        assert len(pairs) == 6 and len(read_pairs(folder, limit=2)) == 2
        records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        for pair, record in zip(pairs, records):
            assert set(REQUIRED_FIELDS) | {"note", "corner", "image_size", "seed"} <= set(record)
            assert pair.corner == corner and pair.subject_shape != pair.object_shape
            full, control = (np.asarray(image) for image in pair.load_images())
            assert full.shape == control.shape == (64, 64, 3)
            assert (control[0, 0] == 245).all()
            x1, y1, x2, y2 = pair.subject_bbox
            outside = np.ones((64, 64), dtype=bool)
            outside[y1:y2, x1:x2] = False
            assert (full[outside] == control[outside]).all()  # differ only inside the subject's box
            assert (full[y1:y2, x1:x2] != control[y1:y2, x1:x2]).any()
            x1, y1, x2, y2 = pair.object_bbox
            assert (full[y1:y2, x1:x2] == control[y1:y2, x1:x2]).all()
            x1, y1, x2, y2 = pair.subject_bbox
            sx, sy = (x1 + x2) / 2, (y1 + y2) / 2
            assert (sx < 32) == corner.endswith("left") and (sy < 32) == corner.startswith("top")
    assert corner_prompt("bottomleft") == "Is there anything in the bottom left corner?"


# ----------------------------------------------------------------------------- broken inputs

def test_missing_root_and_shard(shard_copy):
    with pytest.raises(DataError, match="does not exist"):
        list(iter_worlds(shard_copy.parent / "nowhere"))
    with pytest.raises(DataError, match="shard7"):
        list(iter_worlds(shard_copy, shards=[0, 7]))


def test_a_missing_pairs_folder_names_the_command_that_makes_it_there(tmp_path):
    """Was: "generate one with: python generate_data.py counterfactual --out data", whatever folder was given."""
    given = tmp_path / "my sets"
    with pytest.raises(DataError) as err:
        read_pairs(given / "dataset_topright")
    assert str(err.value) == (f"{given / 'dataset_topright'}: pairs folder does not exist (generate it with: python "
                              f"generate_data.py counterfactual --out '{given}' --corners topright)")
    with pytest.raises(DataError, match=re.escape(f"--out {tmp_path}, then give {tmp_path}/dataset_{{corner}})")):
        read_pairs(tmp_path / "corner_pairs")


def test_caption_world_count_mismatch(shard_copy):
    path = shard_copy / "shard0" / "caption.txt"
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()[:-1]))
    with pytest.raises(DataError, match="caption.txt has 39 captions but world_model.json describes 40"):
        list(iter_worlds(shard_copy))
    assert any("counts must be equal" in p for p in validate_shapeworld(shard_copy))


def test_caption_outside_grammar_is_skipped_or_strict(shard_copy):
    path = shard_copy / "shard0" / "caption.txt"
    lines = path.read_text().splitlines()
    lines[2] = "there are two shapes a red square"
    path.write_text("".join(line + "\n" for line in lines))
    items = list(iter_worlds(shard_copy))
    skipped = [item for item in items if isinstance(item, Skipped)]
    assert len(items) == 40 and len(skipped) == 1
    assert (skipped[0].index, skipped[0].kind) == (2, "caption")
    assert "caption.txt line 3" in skipped[0].reason and "outside the ShapeWorld grammar" in skipped[0].reason
    with pytest.raises(DataError, match="caption.txt line 3"):
        list(iter_worlds(shard_copy, strict=True))
    assert any("caption.txt line 3" in p for p in validate_shapeworld(shard_copy))


def test_world_with_three_entities(shard_copy):
    path = shard_copy / "shard0" / "world_model.json"
    model = json.loads(path.read_text())
    model[4]["entities"].append(dict(model[4]["entities"][0], id=2))
    path.write_text(json.dumps(model))
    skipped = [item for item in iter_worlds(shard_copy) if isinstance(item, Skipped)]
    assert [(s.index, s.kind) for s in skipped] == [(4, "entities")]
    assert "world_model.json world 4: 3 entities (expected 2)" in skipped[0].reason
    with pytest.raises(DataError, match="3 entities"):
        list(iter_worlds(shard_copy, strict=True))
    assert any("world 4: 3 entities" in p for p in validate_shapeworld(shard_copy))


def test_unbindable_mention_and_missing_image(shard_copy):
    path = shard_copy / "shard0" / "caption.txt"
    lines = path.read_text().splitlines()
    caption = parse_caption(lines[1])
    other = next(s for s in SHAPES if s not in (caption.shape1, caption.shape2))
    lines[1] = format_caption(caption.color1, other, caption.color2, caption.shape2, caption.relation)
    path.write_text("".join(line + "\n" for line in lines))
    (shard_copy / "shard0" / "world-6.png").unlink()
    skipped = {s.index: s for s in iter_worlds(shard_copy) if isinstance(s, Skipped)}
    assert skipped[1].kind == "binding" and f"'{caption.color1} {other}'" in skipped[1].reason
    assert skipped[6].kind == "image" and "world-6.png" in skipped[6].reason


def test_unreadable_image(shard_copy):
    image = shard_copy / "shard0" / "world-0.png"
    image.write_bytes(b"this is not a png")
    world = next(iter(iter_worlds(shard_copy)))
    with pytest.raises(DataError, match="world-0.png: cannot read the image"):
        world.load_image()
    assert any("world-0.png: cannot read the image" in p for p in validate_shapeworld(shard_copy))


def test_malformed_world_model(shard_copy):
    path = shard_copy / "shard0" / "world_model.json"
    path.write_text(path.read_text()[:500])
    with pytest.raises(DataError, match=r"world_model.json: not valid JSON \(.* at line \d+ column \d+\)"):
        list(iter_worlds(shard_copy))
    assert any("world_model.json: not valid JSON" in p for p in validate_shapeworld(shard_copy))


def test_world_model_schema_problem(shard_copy):
    path = shard_copy / "shard0" / "world_model.json"
    model = json.loads(path.read_text())
    del model[3]["entities"][1]["center"]
    model[5]["entities"][0]["rotation"] = "half"
    path.write_text(json.dumps(model))
    skipped = {s.index: s for s in iter_worlds(shard_copy) if isinstance(s, Skipped)}
    assert skipped[3].kind == "world_model" and "missing key 'center'" in skipped[3].reason
    problems = validate_shapeworld(shard_copy)
    assert any("world 3 entity 1: missing key 'center'" in p for p in problems)
    assert any("world 5 entity 0: 'rotation' should be a number" in p for p in problems)


def test_agreement_filter_and_missing_agreement(shard_copy):
    path = shard_copy / "shard0" / "agreement.txt"
    path.write_text("1.0\n0.0\n" + "1.0\n" * 38)
    stats = ReadStats()
    indices = [w.index for w in iter_worlds(shard_copy, stats=stats)]
    assert 1 not in indices and stats.filtered == 1 and stats.yielded == 39
    assert 1 in [w.index for w in iter_worlds(shard_copy, agreement_only=False)]
    path.write_text("1.0\nyes\n")
    with pytest.raises(DataError, match="agreement.txt line 2: 'yes' is not a number"):
        list(iter_worlds(shard_copy))
    path.unlink()
    with pytest.raises(DataError, match="agreement.txt: missing.*agreement_only=False"):
        list(iter_worlds(shard_copy))
    assert len([w for w in iter_worlds(shard_copy, agreement_only=False) if isinstance(w, World)]) == 40


def test_broken_pairs_metadata(pairs_root, tmp_path):
    folder = tmp_path / "dataset_topleft"
    shutil.copytree(pairs_root / "dataset_topleft", folder)
    metadata = folder / "metadata.jsonl"
    lines = metadata.read_text().splitlines()

    metadata.write_text("\n".join(lines[:2] + ['{"id": 2, "caption": '] + lines[3:]) + "\n")
    with pytest.raises(DataError, match=r"metadata.jsonl line 3: not valid JSON"):
        read_pairs(folder)
    assert any("line 3: not valid JSON" in p for p in validate_pairs(folder))

    record = json.loads(lines[1])
    del record["bounding_boxes"]
    metadata.write_text("\n".join([lines[0], json.dumps(record)] + lines[2:]) + "\n")
    with pytest.raises(DataError, match="metadata.jsonl line 2: missing field 'bounding_boxes'"):
        read_pairs(folder)

    metadata.write_text("\n".join(lines) + "\n")
    (folder / "images" / "pair_00004_control.png").unlink()
    with pytest.raises(DataError, match="line 5: image file missing: .*pair_00004_control.png"):
        read_pairs(folder)
    with pytest.raises(DataError, match="metadata.jsonl: missing"):
        read_pairs(tmp_path)


def one_line(message) -> str:
    message = str(message)
    assert "\n" not in message and "Traceback" not in message
    return message


def shift_box(entity: dict, dx: float = 0.0, right: float | None = None) -> None:
    """Move a world_model.json entity (box and centre) right by dx; ``right`` sets the box's right edge."""
    box = entity["bounding_box"]
    for point in (box["topleft"], box["bottomright"], entity["center"]):
        point["x"] += dx
    if right is not None:
        box["bottomright"]["x"] = right


def test_box_with_no_area_inside_the_image_is_skipped(shard_copy):
    path = shard_copy / "shard0" / "world_model.json"
    model = json.loads(path.read_text())
    shift_box(model[2]["entities"][0], dx=1.5)  # wholly right of the image
    left = model[5]["entities"][1]["bounding_box"]["topleft"]["x"]
    shift_box(model[5]["entities"][1], right=left)  # zero width
    shift_box(model[7]["entities"][0], dx=-(model[7]["entities"][0]["bounding_box"]["topleft"]["x"] + 0.02))
    path.write_text(json.dumps(model))

    items = list(iter_worlds(shard_copy))
    skipped = {s.index: s for s in items if isinstance(s, Skipped)}
    assert sorted(skipped) == [2, 5]
    assert skipped[2].kind == "box_outside_image"
    assert "world_model.json world 2 entity 0" in skipped[2].reason and "wholly outside" in one_line(skipped[2].reason)
    assert skipped[5].kind == "empty_box" and "world 5 entity 1" in skipped[5].reason
    # a 2 px overhang, as real ShapeWorld boxes have, is still read and clipped
    world7 = next(w for w in items if isinstance(w, World) and w.index == 7)
    assert min(world7.subject.bbox[0], world7.object.bbox[0]) < 0
    assert min(world7.subject.clipped_bbox()[0], world7.object.clipped_bbox()[0]) == 0.0
    with pytest.raises(DataError, match="world 2 entity 0.*wholly outside the image"):
        list(iter_worlds(shard_copy, strict=True))
    problems = validate_shapeworld(shard_copy)
    assert any("world 2 entity 0" in p and "wholly outside" in p for p in problems)
    assert any("world 5 entity 1" in p and "has no area" in p for p in problems)
    assert not any("world 7 " in p for p in problems)


@pytest.mark.parametrize("name", ["caption.txt", "agreement.txt", "world_model.json"])
def test_non_utf8_shard_file(shard_copy, name):
    path = shard_copy / "shard0" / name
    lines = path.read_bytes().split(b"\n")
    lines[2] = b"\xff" + lines[2]
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError) as err:
        list(iter_worlds(shard_copy))
    assert f"{name} line 3: not UTF-8 text (byte 0xff" in one_line(err.value)
    assert any(f"{name} line 3: not UTF-8" in p for p in validate_shapeworld(shard_copy))


def test_non_utf8_pairs_metadata(pairs_root, tmp_path):
    folder = tmp_path / "dataset_topleft"
    shutil.copytree(pairs_root / "dataset_topleft", folder)
    metadata = folder / "metadata.jsonl"
    lines = metadata.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"caption", b"capt\xe9on", 1)  # Latin-1, not UTF-8
    metadata.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError) as err:
        read_pairs(folder)
    assert "metadata.jsonl line 2: not UTF-8 text (byte 0xe9" in one_line(err.value)
    assert [p for p in validate_pairs(folder) if "metadata.jsonl line 2: not UTF-8" in p]


def test_file_given_as_data_folder(tmp_path):
    file = tmp_path / "world_model.json"
    file.write_text("[]")
    message = "is a file, not a folder; point --data at the agreement/relational folder that holds shard0"
    with pytest.raises(DataError, match=message):
        list(iter_worlds(file))
    with pytest.raises(DataError, match=message):
        shapeworld_folder(file)
    assert [one_line(p) for p in validate_shapeworld(file)] == [f"{file}: {message}, shard1, ..."]
    with pytest.raises(DataError, match="is a file, not a folder; point --dataset at"):
        read_pairs(file)


def test_pair_images_corrupt_or_of_different_sizes(pairs_root, tmp_path, monkeypatch):
    folder = tmp_path / "dataset_topleft"
    shutil.copytree(pairs_root / "dataset_topleft", folder)
    pairs = read_pairs(folder)
    pairs[1].full_image.write_bytes(b"not a png")
    Image.open(pairs[2].control_image).resize((32, 32)).save(pairs[2].control_image)

    with pytest.raises(DataError) as err:
        pairs[1].load_images()
    assert one_line(err.value).startswith(f"pair 1: {pairs[1].full_image}: cannot read the image")
    with pytest.raises(DataError) as err:
        pairs[2].load_images()
    assert one_line(err.value).startswith(f"pair 2: {pairs[2].control_image} is 32x32 but the full image")
    problems = validate_pairs(folder)
    assert any("line 2: pair 1:" in p and "cannot read the image" in p for p in problems)
    assert any("line 3: pair 2:" in p and "is 32x32" in p for p in problems)
    # a damaged header can claim a huge picture; PIL refuses it as a decompression bomb
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match="pair 0: .*pair_00000_full.png: cannot read the image"):
        pairs[0].load_images()


def test_long_input_is_cut_in_messages(shard_copy, pairs_root, tmp_path):
    long_word = "x" * 200_000
    path = shard_copy / "shard0" / "caption.txt"
    lines = path.read_text().splitlines()
    lines[1] = "there are two shapes " + long_word
    lines[3] = format_caption(long_word, "square", "red", "circle", "left")
    path.write_text("".join(line + "\n" for line in lines))
    model_path = shard_copy / "shard0" / "world_model.json"
    model = json.loads(model_path.read_text())
    model[6]["entities"][0]["rotation"] = long_word
    model_path.write_text(json.dumps(model))

    skipped = {s.index: s.reason for s in iter_worlds(shard_copy) if isinstance(s, Skipped)}
    assert sorted(skipped) == [1, 3, 6]
    assert f"... ({len(lines[1])} characters)" in skipped[1]
    assert "unknown colour 'xxxx" in skipped[3] and "... (200000 characters)" in skipped[3]
    assert "'rotation' should be a number, got 'xxx" in skipped[6]
    problems = validate_shapeworld(shard_copy)
    assert len(problems) == 3
    for message in [*skipped.values(), *problems]:
        assert len(one_line(message)) < 600, message[:700]

    (shard_copy / "shard0" / "agreement.txt").write_text("1.0\n" + long_word + "\n")
    with pytest.raises(DataError) as err:
        list(iter_worlds(shard_copy))
    assert "agreement.txt line 2: 'xxx" in err.value.args[0] and len(one_line(err.value)) < 600

    folder = tmp_path / "dataset_topleft"
    shutil.copytree(pairs_root / "dataset_topleft", folder)
    records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    records[0]["relation"] = long_word
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError) as err:
        read_pairs(folder)
    assert "line 1: relation 'xxx" in err.value.args[0] and len(one_line(err.value)) < 600


def test_cli_rejects_bad_options_in_one_line(tmp_path):
    for args in (["counterfactual", "--corners", "middle"], ["shapeworld", "--worlds-per-shard", "0"]):
        run = subprocess.run([sys.executable, str(REPO / "generate_data.py"), *args, "--out", str(tmp_path)],
                             capture_output=True, text=True, cwd=REPO)
        assert run.returncode == 2, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
        assert args[2] in run.stderr
    assert not any(tmp_path.iterdir())


def run_generator(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "generate_data.py"), *args], capture_output=True, text=True,
                          cwd=REPO)


@pytest.mark.parametrize("command", ["counterfactual", "shapeworld"])
def test_cli_refuses_an_image_too_large_to_draw(command, tmp_path):
    """Was a bare numpy out-of-memory traceback."""
    run = run_generator(command, "--out", str(tmp_path), "--image-size", "100000")
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        "error: --image-size 100000: too large to draw in memory, and no model here takes more than 3584 px a "
        "side (use 4096 or less)"]
    assert not any(tmp_path.iterdir())
    with pytest.raises(OptionError, match="--image-size 4097: too large"):  # the bound is 4096, exactly
        generate_counterfactual(tmp_path, count=1, image_size=4097, corners=["topleft"])


def test_shapeworld_refuses_a_folder_with_shards(tmp_path):
    """Two shards of seed 0 overwritten by one shard of seed 5 left shard1 and world-2/3.png of seed 0 beside it."""
    out = tmp_path / "sw"
    generate_shapeworld(out, shards=2, worlds_per_shard=4, seed=0)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    run = run_generator("shapeworld", "--out", str(out), "--shards", "1", "--worlds-per-shard", "2", "--seed", "5")
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"error: --out {out}: already holds shard folders (shard0, shard1); choose an empty folder or delete {out} "
        "first (generating over it would mix two data sets)"]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (tmp_path / "empty").mkdir()
    generate_shapeworld(tmp_path / "empty", shards=1, worlds_per_shard=1)  # a folder that exists but is empty: fine


def test_counterfactual_refuses_a_finished_corner_and_completes_an_interrupted_one(tmp_path):
    generate_counterfactual(tmp_path, count=2, corners=["topleft"])
    with pytest.raises(OptionError) as err:
        generate_counterfactual(tmp_path, count=3, seed=1, corners=["topright", "topleft"])
    assert str(err.value) == (f"--out {tmp_path}: already holds dataset_topleft/metadata.jsonl; choose an empty "
                              f"folder or delete {tmp_path / 'dataset_topleft'} first (generating over it would mix "
                              "two data sets)")
    assert not (tmp_path / "dataset_topright").exists()  # refused before anything was written
    generate_counterfactual(tmp_path, count=2, corners=["bottomleft"])  # other corners beside it, as the sweep does
    (tmp_path / "dataset_bottomleft" / "metadata.jsonl").unlink()  # interrupted before its last file
    generate_counterfactual(tmp_path, count=2, corners=["bottomleft"])
    assert len(read_pairs(tmp_path / "dataset_bottomleft")) == 2
