"""Reading the out-dirs of ``head_attention_stats.py``: one folder's scores, count
cube and blank control checked on load (``load_corner_run``), and the four corners'
folders checked to belong together (``load_corner_runs``): one per corner, the same
layers and H, and the same scoring settings.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spatial_attention.common.errors import DataError
from spatial_attention.experiments.heads import CORNERS, topk_count_cube

log = logging.getLogger("spatial_attention")

# meta.json keys that must agree across the corners: the heads of another model, the score of another
# patch_size and the count cube of another topk cannot be averaged into one M_shared
SAME_SETTING_KEYS = ("model", "model_path", "patch_size", "topk")
# likewise scores of another image size, answer length, question or precision; older out-dirs lack some
# of these keys, so they are compared only where both folders record them
SAME_IF_RECORDED_KEYS = ("feed_size", "max_new_tokens", "prompt_template", "dtype")
# and these, where a folder that does not record one was made before it existed, with its default
SAME_WITH_DEFAULT_KEYS = {"score": "attention"}
BLANK_FILE = "scores_blank_LHM.npy"  # blank image, mass on the corner block
BLANK_IMAGE_FILE = "scores_blank_image_LHM.npy"  # blank image, mass on all image tokens


@dataclass
class BlankControl:
    """The position-only control of one out-dir: the blank image's attention mass [L, H, M] on the
    corner block and on all image tokens, and the block's share of the image tokens."""
    block: np.ndarray
    image: np.ndarray
    area_share: float


@dataclass
class CornerRun:
    """One ``head_attention_stats.py`` out-dir: scores [L, H, N], count cube, the blank control if it has one."""
    folder: Path
    meta: dict
    full: np.ndarray
    control: np.ndarray
    count: np.ndarray
    blank: BlankControl | None

    @property
    def corner(self) -> str:
        return self.meta["corner"]

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in self.meta["layers"]]


def _load_array(path: Path, shape: tuple[int, ...] | None, what: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: missing ({what}; written by head_attention_stats.py)")
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable .npy file ({err})") from None
    if shape is not None and a.shape != shape:
        raise DataError(f"{path}: shape {a.shape}, but meta.json says [L, H, N] = {list(shape)}")
    if not np.all(np.isfinite(a)):
        raise DataError(f"{path}: contains NaN or infinite values")
    return a


def load_corner_run(folder: Path) -> CornerRun:
    """Read and check one out-dir; any problem is a one-line DataError naming the folder or file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (expected an out-dir of head_attention_stats.py)")
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: missing (every out-dir of head_attention_stats.py has one)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{meta_path}: not readable JSON ({err})") from None
    missing = [k for k in ("corner", "layers", "H", "N") if k not in meta]
    if missing:
        raise DataError(f"{meta_path}: lacks {', '.join(missing)}")
    if not isinstance(meta["layers"], list) or not all(isinstance(x, int) for x in meta["layers"]):
        raise DataError(f"{meta_path}: layers must be a list of 1-based layer numbers, got {meta['layers']!r}")
    if meta["corner"] not in CORNERS:
        raise DataError(f"{meta_path}: corner {meta['corner']!r} is not one of {', '.join(CORNERS)}")
    shape = (len(meta["layers"]), int(meta["H"]), int(meta["N"]))
    full = _load_array(folder / "scores_full_LHN.npy", shape, "full-image scores")
    control = _load_array(folder / "scores_control_LHN.npy", shape, "control-image scores")
    count = _load_array(folder / "count_LHN.npy", shape, "count cube")
    if not np.isin(count, (0, 1)).all():
        raise DataError(f"{folder / 'count_LHN.npy'}: a count cube holds only 0 and 1")
    blank = _load_blank(folder, meta, shape[:2])
    if "topk" in meta:
        recomputed = topk_count_cube(full, control, int(meta["topk"]))
        n_off = int((recomputed != count).any(axis=1).sum())
        if n_off:
            log.warning("%s: count_LHN.npy differs from the top-%s of |full - control| in %d (layer, pair) cells; "
                        "using the file as written", folder, meta["topk"], n_off)
    return CornerRun(folder, meta, full, control, count.astype(np.uint8), blank)


def _load_blank(folder: Path, meta: dict, lh: tuple[int, int]) -> BlankControl | None:
    """The blank control; None for an out-dir without both blank scores and meta.json's blank_block."""
    block_meta = meta.get("blank_block")
    if block_meta is None or not (folder / BLANK_FILE).is_file() or not (folder / BLANK_IMAGE_FILE).is_file():
        return None
    block = _load_array(folder / BLANK_FILE, None, "blank-image scores on the corner block")
    image = _load_array(folder / BLANK_IMAGE_FILE, None, "blank-image scores on all image tokens")
    if block.ndim != 3 or block.shape[:2] != lh or block.shape[2] < 1:
        raise DataError(f"{folder / BLANK_FILE}: shape {block.shape}, expected [L, H, M] = [{lh[0]}, {lh[1]}, M >= 1]")
    if image.shape != block.shape:
        raise DataError(f"{folder / BLANK_IMAGE_FILE}: shape {image.shape}, but {BLANK_FILE} has {block.shape}")
    try:
        (gh, gw), rows, cols = block_meta["grid"], block_meta["rows"], block_meta["cols"]
        area_share = rows * cols / (gh * gw)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        area_share = None
    if area_share is None or not 0 < area_share <= 1:
        raise DataError(f"{folder / 'meta.json'}: blank_block {block_meta!r} needs rows and cols of a block that "
                        "fits the token grid [gh, gw]")
    return BlankControl(block, image, area_share)


def load_corner_runs(folders: list[Path]) -> dict[str, CornerRun]:
    """{corner: run} for exactly one folder per corner, all with the same layers and H."""
    runs: dict[str, CornerRun] = {}
    for folder in folders:
        run = load_corner_run(folder)
        if run.corner in runs:
            raise DataError(f"{runs[run.corner].folder} and {run.folder} are both corner {run.corner!r} "
                            "(meta.json); give one folder per corner")
        runs[run.corner] = run
    first = next(iter(runs.values()))
    _check_same_setting(first, runs.values())
    for run in runs.values():
        if run.layers != first.layers or run.full.shape[1] != first.full.shape[1]:
            raise DataError(f"{run.folder}: layers {run.layers} and H = {run.full.shape[1]} do not match "
                            f"{first.folder} (layers {first.layers}, H = {first.full.shape[1]}); "
                            "all corners must come from the same model and layer selection")
    missing = [c for c in CORNERS if c not in runs]
    if missing:
        raise DataError(f"no folder for corner {', '.join(missing)}; give one out-dir each for "
                        f"{', '.join(CORNERS)}")
    return {c: runs[c] for c in CORNERS}


def _setting(meta: dict, keys: list[str]) -> str:
    """A run's values of ``keys``, for an error message."""
    return ", ".join(f"{key} {meta.get(key)!r}" for key in keys)


def _differing_keys(a: dict, b: dict) -> list[str]:
    """The setting keys in which two meta.json differ."""
    differing = [key for key in SAME_SETTING_KEYS if a.get(key) != b.get(key)]
    differing += [key for key in SAME_IF_RECORDED_KEYS if key in a and key in b and a[key] != b[key]]
    return differing + [key for key, default in SAME_WITH_DEFAULT_KEYS.items()
                        if a.get(key, default) != b.get(key, default)]


def _check_same_setting(first: CornerRun, runs) -> None:
    """DataError naming both folders when a run's scoring settings differ from ``first``'s."""
    for run in runs:
        differing = _differing_keys(first.meta, run.meta)
        if differing:
            shown = list(dict.fromkeys([*SAME_SETTING_KEYS, *differing]))
            raise DataError(f"{first.folder} ({_setting(first.meta, shown)}) and {run.folder} "
                            f"({_setting(run.meta, shown)}) differ in {', '.join(differing)}: the shared/unique "
                            "analysis needs all four corners scored by one model with the same settings")
