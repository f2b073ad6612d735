"""Reader for the fixed-position counterfactual pairs of the corner experiments.

A corner folder (``data/dataset_{corner}/``, spec: shapeworld_format.md) holds
``images/pair_{i:05d}_full.png`` (subject + object), ``..._control.png`` (the
same picture with the subject removed) and ``metadata.jsonl``, one JSON object
per pair. The subject sits in the named corner cell of a 3x3 grid and the
object in the opposite corner; each folder is paired with the prompt
``CORNER_PROMPT`` (``corner_prompt(corner)``).
"""
from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from string import Formatter

import numpy as np
from PIL import Image

from spatial_attention.common.errors import DataError, OptionError, input_folder, quote
from spatial_attention.data.shapeworld import load_rgb, read_text

CORNERS = ("topleft", "topright", "bottomleft", "bottomright")
CORNER_WORDS = {"topleft": "top left", "topright": "top right", "bottomleft": "bottom left",
                "bottomright": "bottom right"}
RELATION_OF_CORNER = {"topleft": "upper_left_of", "topright": "upper_right_of", "bottomleft": "lower_left_of",
                      "bottomright": "lower_right_of"}  # where the subject is, relative to the object
CORNER_OF_RELATION = {relation: corner for corner, relation in RELATION_OF_CORNER.items()}
REQUIRED_FIELDS = ("id", "caption", "relation", "subject_shape", "object_shape", "full_image", "control_image",
                   "bounding_boxes")

# The question asked with every image of a corner folder; '{corner}' becomes the corner's words.
CORNER_PROMPT = "Is there anything in the {corner} corner?"
# the key of a data set's identity that tells it from another of the same corner (a regenerated one changes it)
DIGEST_KEY = "--dataset (sha256 of its metadata.jsonl)"
# Heads are found on one half of a data set's pairs and tested on the other (``split_pairs``): the best heads of
# some pairs beat random heads on those same pairs by chance too.
PAIR_SPLITS = ("all", "discovery", "test")
SPLIT_KEY = "--pairs"

PixelBox = tuple[int, int, int, int]


def corner_prompt(corner: str) -> str:
    """The question asked about a corner folder's images."""
    if corner not in CORNER_WORDS:
        raise OptionError(f"corner {corner!r}: choose from {', '.join(CORNERS)}")
    return fill_corner_prompt(CORNER_PROMPT, corner)


def fill_corner_prompt(template: str, corner: str, source: str = "--prompt") -> str:
    """``template`` with '{corner}' replaced by the corner's words ('top left'). OptionError naming
    ``source`` (the option or file the template came from) when it is empty or holds any other
    placeholder, so that a caller can check a template before a model loads."""
    words = CORNER_WORDS[corner]
    if not template.strip():
        raise OptionError(f"{source} {template!r}: empty; ask a question, e.g. {corner_prompt(corner)!r}")
    try:
        fields = {field for _, field, _, _ in Formatter().parse(template) if field is not None}
        if fields <= {"corner"}:  # '{0}', '{}', '{corner[0]}' or '{corner.x}' are other fields
            return template.format(corner=words)
    except (ValueError, KeyError, IndexError, AttributeError):  # unbalanced braces, a bad format spec
        pass
    raise OptionError(f"{source} {template!r}: '{{corner}}' is the only placeholder a prompt may hold; "
                      "write other braces doubled ({{ }})")


@dataclass(frozen=True)
class Pair:
    """One full/control pair. Boxes are pixels (x1, y1, x2, y2), x2/y2 exclusive."""
    id: int | str
    corner: str
    caption: str
    relation: str
    subject_shape: str
    object_shape: str
    full_image: Path
    control_image: Path
    subject_bbox: PixelBox
    object_bbox: PixelBox
    note: str

    def load_images(self) -> tuple[Image.Image, Image.Image]:
        """(full, control) as RGB images. ``DataError``, one line naming the pair
        and the file, when one cannot be read or the two differ in size (the
        scorers compare them patch by patch); callers count such a pair as skipped."""
        try:
            full, control = load_rgb(self.full_image), load_rgb(self.control_image)
        except DataError as err:
            raise DataError(f"pair {quote(self.id)}: {err}") from None
        if full.size != control.size:
            raise DataError(f"pair {quote(self.id)}: {self.control_image} is {control.width}x{control.height} but "
                            f"the full image {self.full_image} is {full.width}x{full.height}; the two must be the "
                            "same size, regenerate the pair")
        return full, control


@dataclass(frozen=True)
class CornerDataset:
    """One --dataset folder: its corner, its pairs (those of ``split``) and the digest of its metadata.jsonl."""
    folder: Path
    corner: str
    pairs: list[Pair]
    metadata_sha256: str
    split: str = "all"

    @property
    def identity(self) -> dict:
        """What tells this data set from another of the same corner (a regenerated one changes the digest), and
        the half of it used (recorded only where it is not all: folders made before the split stay readable)."""
        return {"--dataset": str(self.folder.resolve()), DIGEST_KEY: self.metadata_sha256,
                **({} if self.split == "all" else {SPLIT_KEY: self.split})}


def _pixel_box(value, where: str) -> PixelBox:
    if not (isinstance(value, list) and len(value) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise DataError(f"{where} should be [x1, y1, x2, y2] in pixels, got {quote(value)}")
    return tuple(int(round(v)) for v in value)


def _pair(record, folder: Path, where: str) -> Pair:
    """One metadata record as a Pair (image files not checked); ``DataError`` naming ``where``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in REQUIRED_FIELDS if key not in record]
    if missing:
        raise DataError(f"{where}: missing field {missing[0]!r} (each line needs {', '.join(REQUIRED_FIELDS)})")
    relation = record["relation"]
    if relation not in CORNER_OF_RELATION:
        raise DataError(f"{where}: relation {quote(relation)} is not one of {', '.join(CORNER_OF_RELATION)}")
    corner = record.get("corner", CORNER_OF_RELATION[relation])
    if corner not in CORNERS or RELATION_OF_CORNER[corner] != relation:
        raise DataError(f"{where}: corner {quote(corner)} does not go with relation {relation!r}")
    boxes = record["bounding_boxes"]
    if not isinstance(boxes, dict) or "subject" not in boxes or "object" not in boxes:
        raise DataError(f"{where}: 'bounding_boxes' needs 'subject' and 'object' boxes, got {quote(boxes)}")
    return Pair(id=record["id"], corner=corner, caption=str(record["caption"]), relation=relation,
                subject_shape=str(record["subject_shape"]), object_shape=str(record["object_shape"]),
                full_image=folder / record["full_image"], control_image=folder / record["control_image"],
                subject_bbox=_pixel_box(boxes["subject"], f"{where}: bounding_boxes.subject"),
                object_bbox=_pixel_box(boxes["object"], f"{where}: bounding_boxes.object"),
                note=str(record.get("note", "")))


def _records(folder: Path) -> list[tuple[str, object]]:
    """(where, parsed JSON or the JSONDecodeError) for each non-blank line of metadata.jsonl."""
    folder = input_folder(folder, "--dataset", "a data/dataset_{corner} folder that holds metadata.jsonl and images/",
                          f"pairs folder does not exist ({_how_to_generate(Path(folder))})")
    path = folder / "metadata.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: missing (a pairs folder needs metadata.jsonl and images/)")
    records = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip():
            where = f"{path} line {number}"
            try:
                records.append((where, json.loads(line)))
            except json.JSONDecodeError as err:
                records.append((where, err))
    return records


def _how_to_generate(folder: Path) -> str:
    """How to make the missing pairs folder ``folder``: generate_data.py writes OUT/dataset_{corner}."""
    corner = folder.name.removeprefix("dataset_")
    out = shlex.quote(str(folder.parent))
    if corner in CORNERS:
        return f"generate it with: python generate_data.py counterfactual --out {out} --corners {corner}"
    return f"generate_data.py names them dataset_{{corner}}: python generate_data.py counterfactual --out {out}, " \
           f"then give {out}/dataset_{{corner}}"


def _bad_json(where: str, err: json.JSONDecodeError) -> str:
    return f"{where}: not valid JSON ({err.msg} at column {err.colno})"


def read_pairs(folder: Path, limit: int | None = None) -> list[Pair]:
    """The pairs of a corner folder in file order (at most ``limit``);
    ``DataError`` naming the file and line of the first bad record or missing image."""
    folder = Path(folder)
    pairs = []
    for where, record in _records(folder):
        if isinstance(record, json.JSONDecodeError):
            raise DataError(_bad_json(where, record))
        pair = _pair(record, folder, where)
        for path in (pair.full_image, pair.control_image):
            if not path.is_file():
                raise DataError(f"{where}: image file missing: {path}")
        pairs.append(pair)
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise DataError(f"{folder / 'metadata.jsonl'}: no pairs")
    return pairs


def corner_of(pairs: list[Pair], folder) -> str:
    """The one corner all pairs of a folder share; DataError when they are of several."""
    corners = sorted({pair.corner for pair in pairs})
    if len(corners) != 1:
        raise DataError(f"{folder}: pairs of several corners ({', '.join(corners)}); a corner folder holds one")
    return corners[0]


def split_pairs(pairs: list, split: str) -> list:
    """The pairs of one half: ``discovery`` the 1st, 3rd, 5th, ... (heads are found on these), ``test`` the 2nd,
    4th, ... (the heads found are tested on these), ``all`` every pair. Disjoint, and alike in size and order."""
    if split not in PAIR_SPLITS:
        raise ValueError(f"split must be one of {PAIR_SPLITS}, not {split!r}")
    return pairs if split == "all" else pairs[0::2] if split == "discovery" else pairs[1::2]


def splits_overlap(found_on: str, tested_on: str) -> bool:
    """Whether heads found on the ``found_on`` pairs of a data set would be tested on some of the same pairs."""
    return "all" in (found_on, tested_on) or found_on == tested_on


def read_dataset(folder: Path, limit: int | None, split: str = "all") -> CornerDataset:
    """One corner folder's pairs (of the first ``limit``, those of ``split``) and the digest of its whole
    metadata.jsonl."""
    pairs = read_pairs(folder, limit=limit)
    ids = [pair.id for pair in pairs]
    if len(set(ids)) < len(ids):
        raise DataError(f"{folder}: pair ids repeat; each pair needs its own id (a rerun resumes by id)")
    digest = hashlib.sha256((folder / "metadata.jsonl").read_bytes()).hexdigest()
    half = split_pairs(pairs, split)
    if not half:
        raise DataError(f"{folder}: no {split} pairs among its {len(pairs)} (the test half is every second pair); "
                        "generate more pairs, or raise --max-pairs")
    return CornerDataset(folder, corner_of(pairs, folder), half, digest, split)


def _pixel_problems(pair: Pair, where: str) -> list[str]:
    """Image checks: readable and the same size (Pair.load_images), boxes inside
    the picture, and the two pictures differ only in the subject's box (1 px of
    slack) with the object untouched."""
    try:
        full, control = (np.asarray(image) for image in pair.load_images())
    except DataError as err:
        return [f"{where}: {err}"]
    height, width = full.shape[:2]
    problems = []
    for role, (x1, y1, x2, y2) in (("subject", pair.subject_bbox), ("object", pair.object_bbox)):
        if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
            problems.append(f"{where}: {role} box {[x1, y1, x2, y2]} is not inside the {width}x{height} image")
    if problems:
        return problems
    differs = np.any(full != control, axis=2)
    x1, y1, x2, y2 = pair.subject_bbox
    outside = differs.copy()
    outside[max(y1 - 1, 0):y2 + 1, max(x1 - 1, 0):x2 + 1] = False
    if outside.any():
        ys, xs = np.nonzero(outside)
        problems.append(f"{where}: {len(xs)} pixels differ outside the subject box, e.g. at x={xs[0]}, y={ys[0]}")
    if not differs.any():
        problems.append(f"{where}: full and control images are identical (no subject drawn)")
    x1, y1, x2, y2 = pair.object_bbox
    if differs[y1:y2, x1:x2].any():
        problems.append(f"{where}: the object box differs between full and control")
    return problems


def validate_pairs(folder: Path) -> list[str]:
    """Every problem found in a corner folder, one line each; empty = valid."""
    folder = Path(folder)
    try:
        records = _records(folder)
    except DataError as err:
        return [str(err)]
    if not records:
        return [f"{folder / 'metadata.jsonl'}: no pairs"]
    named = re.fullmatch(r"dataset_(\w+)", folder.name)
    problems = []
    for where, record in records:
        if isinstance(record, json.JSONDecodeError):
            problems.append(_bad_json(where, record))
            continue
        try:
            pair = _pair(record, folder, where)
        except DataError as err:
            problems.append(str(err))
            continue
        if named and named.group(1) in CORNERS and named.group(1) != pair.corner:
            problems.append(f"{where}: corner {pair.corner!r} in a folder named {folder.name}")
        problems += _pixel_problems(pair, where)
    return problems
