"""Attention maps against ground-truth masks: the definitions of ``../shared/specs/metrics.md`` (the spec beside
the checkout).

Conventions used throughout:

- A map ``a`` is a (gh, gw) array of non-negative attention over the image-token grid in
  raster order (row-major, top-left first). Every metric normalises it to sum 1 first.
- A mask is a boolean (gh, gw) array of the same shape.
- Coordinates are patch indices: cell (row y, column x) has its centre at (y, x), so
  distances are in patches and squared distances in patches^2.
- A mask metric (one that compares the map with a mask) is None when its mask is empty:
  there is no target to compare with.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

# Experiment 1's maps, in display order: three word-to-image maps, then the image self-attention maps seeded
# at the subject, the object and the background, from the language model's image block and the vision encoder.
MAPS = ("subject_cross", "relation_cross", "object_cross", "subject_self_lm", "object_self_lm",
        "background_self_lm", "subject_self_vit", "object_self_vit", "background_self_vit")
CROSS_MAPS = MAPS[:3]
# what ``map_metrics`` computes for every map
METRIC_NAMES = ("com", "iou", "soft_iou", "wasserstein_x", "wasserstein_y", "entity_bg_ratio", "dispersion", "entropy")
RELATION_METRIC = "relation_wasserstein"  # the relation map's own metric
# binding specificity of the maps about one entity (``specificity``): own referent minus the other shape
SPECIFICITY_METRICS = ("specificity_iou", "specificity_soft_iou", "specificity_com")
SPECIFIC_ROLES = {"subject": "object", "object": "subject"}  # a map's referent -> the other shape
# specificities that salience and locality cannot pass (issue 26): a word map against the same caption position
# naming the other shape (``word_swap_specificity``), a seed map against the cells as far from its seed
# (``distance_matched_specificity``)
WORD_SWAP = "specificity_word_swap"
DISTANCE_MATCHED = "specificity_distance_matched"
BINDING_METRICS = SPECIFICITY_METRICS + (WORD_SWAP, DISTANCE_MATCHED)  # per-world differences: 0 = no preference
METRICS = METRIC_NAMES[:5] + (RELATION_METRIC,) + METRIC_NAMES[5:] + BINDING_METRICS  # display order
HIGHER_IS_BETTER = frozenset({"iou", "soft_iou", "entity_bg_ratio", *BINDING_METRICS})


def display_order(names, known: Sequence[str]) -> list[str]:
    """The distinct ``names`` in the order of ``known``; names not in it follow, alphabetically."""
    rank = {name: i for i, name in enumerate(known)}
    return sorted(set(names), key=lambda n: (rank.get(n, len(known)), n))


# Below this a quantity that is a sum of fractions counts as zero (rounding noise, not signal).
ZERO_TOL = 1e-12


# --------------------------------------------------------------------------- masks

def clip_box(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    """A normalised box (x1, y1, x2, y2) clipped to the image, [0, 1] on both axes."""
    return tuple(min(max(float(v), 0.0), 1.0) for v in bbox)


def box_problem(bbox: Sequence[float]) -> tuple[str, str] | None:
    """(kind, what is wrong) when a normalised box has no area inside the image, else None.

    kind is "empty_box" (zero or negative width or height) or "box_outside_image"
    (a real box, but clipping leaves nothing of it). A box that overhangs the
    image a little is fine: real ShapeWorld boxes do, and clipping handles it.
    The one place this rule lives: entity_mask refuses such boxes, and the
    ShapeWorld reader skips their worlds.
    """
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if not (x1 < x2 and y1 < y2):  # written so that NaN lands here too
        return "empty_box", "has no area (needs x1 < x2 and y1 < y2)"
    x1, y1, x2, y2 = clip_box(bbox)
    if not (x1 < x2 and y1 < y2):
        return "box_outside_image", "lies wholly outside the image (no area inside [0, 1])"
    return None


def entity_mask(bbox: Sequence[float], grid: tuple[int, int]) -> np.ndarray:
    """Boolean (gh, gw) patch mask of a normalised box (x1, y1, x2, y2).

    The box is clipped to [0, 1]; the mask holds columns floor(x1*gw) .. floor(x2*gw)
    and rows floor(y1*gh) .. floor(y2*gh), each clamped to the grid, inclusive. So a
    box edge on a cell boundary includes the cell it starts. A box with no area
    inside the image (see box_problem) raises ValueError: clipped, it would become
    a line of cells it does not cover.
    """
    problem = box_problem(bbox)
    if problem is not None:
        raise ValueError(f"bounding box {tuple(bbox)}: {problem[1]}")
    gh, gw = grid
    x1, y1, x2, y2 = clip_box(bbox)
    c1, c2 = (min(int(np.floor(v * gw)), gw - 1) for v in (x1, x2))
    r1, r2 = (min(int(np.floor(v * gh)), gh - 1) for v in (y1, y2))
    mask = np.zeros((gh, gw), dtype=bool)
    mask[r1:r2 + 1, c1:c2 + 1] = True
    return mask


def region_masks(subject_mask: np.ndarray, object_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(subject_only, object_only, background): each entity minus the overlap, and neither entity."""
    subject_mask, object_mask = np.asarray(subject_mask, bool), np.asarray(object_mask, bool)
    return subject_mask & ~object_mask, object_mask & ~subject_mask, ~(subject_mask | object_mask)


# --------------------------------------------------------------------------- map metrics

def normalise(a: np.ndarray) -> np.ndarray:
    """a / sum(a) as float64; a must be finite, non-negative and not all zero."""
    a = np.asarray(a, dtype=np.float64)
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError("attention map: values must be finite and non-negative")
    total = a.sum()
    if total <= 0:
        raise ValueError("attention map: sums to 0, nothing to normalise")
    return a / total


def _check(a: np.ndarray, *masks: np.ndarray) -> tuple[np.ndarray, ...]:
    a = normalise(a)
    if a.ndim != 2:
        raise ValueError(f"attention map: expected a (gh, gw) array, got shape {a.shape}")
    out = [a]
    for mask in masks:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != a.shape:
            raise ValueError(f"mask shape {mask.shape} differs from the map's {a.shape}")
        out.append(mask)
    return tuple(out)


def _centre(w: np.ndarray) -> tuple[float, float]:
    """(y, x) centre of mass of the non-negative weights w (sum > 0), in patches."""
    ys, xs = np.indices(w.shape)
    total = w.sum()
    return float((w * ys).sum() / total), float((w * xs).sum() / total)


def _marginal(w: np.ndarray, axis: str) -> np.ndarray:
    """Marginal of w on an axis: per column for 'x', per row for 'y'."""
    if axis == "x":
        return w.sum(axis=0)
    if axis == "y":
        return w.sum(axis=1)
    raise ValueError(f"axis {axis!r}: must be 'x' or 'y'")


def _w1(p: np.ndarray, q: np.ndarray) -> float:
    """W1 between two distributions on the same unit-spaced 1-D grid: sum |CDF_p - CDF_q|, in patches."""
    return float(np.abs(np.cumsum(p) - np.cumsum(q)).sum())


def com_distance(a: np.ndarray, mask: np.ndarray) -> float | None:
    """Euclidean distance (patches) between the attention centre of mass and the mask centroid."""
    a, mask = _check(a, mask)
    if not mask.any():
        return None
    (ay, ax), (my, mx) = _centre(a), _centre(mask.astype(np.float64))
    return float(np.hypot(ay - my, ax - mx))


def topk_iou(a: np.ndarray, mask: np.ndarray) -> float | None:
    """IoU of the mask with the k = |mask| cells of highest attention (unitless).

    Exactly k cells are taken; among equal values the lower raster index comes first
    (a stable sort of -a).
    """
    a, mask = _check(a, mask)
    k = int(mask.sum())
    if k == 0:
        return None
    top = np.zeros(a.size, dtype=bool)
    top[np.argsort(-a.ravel(), kind="stable")[:k]] = True
    m = mask.ravel()
    return float((top & m).sum() / (top | m).sum())


def soft_iou(a: np.ndarray, mask: np.ndarray) -> float | None:
    """sum(a*m) / (sum(a) + sum(m) - sum(a*m)) with a normalised and m binary (unitless)."""
    a, mask = _check(a, mask)
    if not mask.any():
        return None
    inter = float(a[mask].sum())
    return inter / (1.0 + float(mask.sum()) - inter)


def _wasserstein(a: np.ndarray, mask: np.ndarray, axis: str) -> float | None:
    a, mask = _check(a, mask)
    if not mask.any():
        return None
    m = mask.astype(np.float64)
    return _w1(_marginal(a, axis), _marginal(m / m.sum(), axis))


def wasserstein_x(a: np.ndarray, mask: np.ndarray) -> float | None:
    """W1 (patches) between the column marginals of a and of the normalised mask."""
    return _wasserstein(a, mask, "x")


def wasserstein_y(a: np.ndarray, mask: np.ndarray) -> float | None:
    """W1 (patches) between the row marginals of a and of the normalised mask."""
    return _wasserstein(a, mask, "y")


def entity_bg_ratio(a: np.ndarray, entity_only: np.ndarray, background: np.ndarray) -> float | None:
    """Attention mass on ``entity_only`` / mass on ``background`` (unitless).

    None when the background holds no attention (mass <= ZERO_TOL of the normalised
    map: the ratio would be unbounded) and when ``entity_only`` is empty (one box
    inside the other: the ratio would be 0 whatever the map, which measures nothing).
    """
    a, entity_only, background = _check(a, entity_only, background)
    bg = float(a[background].sum())
    if not entity_only.any() or bg <= ZERO_TOL:
        return None
    return float(a[entity_only].sum()) / bg


def dispersion(a: np.ndarray) -> float:
    """sum a * ((y - y_mean)^2 + (x - x_mean)^2), in patches^2 (0 for a point mass)."""
    (a,) = _check(a)
    ym, xm = _centre(a)
    ys, xs = np.indices(a.shape)
    return float((a * ((ys - ym) ** 2 + (xs - xm) ** 2)).sum())


def entropy(a: np.ndarray) -> float:
    """-sum a * log(a), natural log (nats), with 0 * log 0 = 0."""
    (a,) = _check(a)
    p = a[a > 0]
    return float(-(p * np.log(p)).sum())


def map_metrics(a: np.ndarray, mask: np.ndarray, entity_only: np.ndarray,
                background: np.ndarray) -> dict[str, float | None]:
    """Every metric of METRIC_NAMES for map ``a`` against its target ``mask``
    (entity_bg_ratio uses ``entity_only`` and ``background``)."""
    a = normalise(a)
    return {"com": com_distance(a, mask), "iou": topk_iou(a, mask), "soft_iou": soft_iou(a, mask),
            "wasserstein_x": wasserstein_x(a, mask), "wasserstein_y": wasserstein_y(a, mask),
            "entity_bg_ratio": entity_bg_ratio(a, entity_only, background),
            "dispersion": dispersion(a), "entropy": entropy(a)}


def specificity(a: np.ndarray, own: np.ndarray, other: np.ndarray) -> dict[str, float | None]:
    """Binding specificity of map ``a`` about one entity: its score against its own referent's mask
    minus its score against the other shape's, signed so that positive means "looks at its own referent
    more than at the other shape" (for com: the other centroid's distance minus the own one's).
    The patch-shuffle baseline rewards attention to any shape; this tells grounding from salience."""
    a = normalise(a)

    def minus(x: float | None, y: float | None) -> float | None:
        return None if x is None or y is None else x - y

    return {"specificity_iou": minus(topk_iou(a, own), topk_iou(a, other)),
            "specificity_soft_iou": minus(soft_iou(a, own), soft_iou(a, other)),
            "specificity_com": minus(com_distance(a, other), com_distance(a, own))}


def word_swap_specificity(named: np.ndarray, swapped: np.ndarray, referent: np.ndarray) -> float | None:
    """How much a word's map follows the shape the word names: top-k IoU with its referent of the word's map
    (``named``) minus that of the map at the same caption position when the caption's two shape mentions are
    exchanged, so that the position names the other shape (``swapped``). A map led by the image (one shape's
    salience) or by the position, not by the word, scores 0; one that follows the word scores above 0."""
    here, there = topk_iou(normalise(named), referent), topk_iou(normalise(swapped), referent)
    return None if here is None or there is None else here - there


# --------------------------------------------------------------------------- relation ground truth

def first_along_axis(relation: str) -> str:
    """Which entity comes first along the relation's axis ("subject" = first-mentioned).

    "A left of B" / "A above B": the subject A is left / upper, so first;
    "A right of B" / "A below B": the object B is.
    """
    order = {"left": "subject", "above": "subject", "right": "object", "below": "object"}
    if relation not in order:
        raise ValueError(f"relation {relation!r}: must be one of {', '.join(order)}")
    return order[relation]


def relation_target(first_mask: np.ndarray, second_mask: np.ndarray, axis: str) -> np.ndarray | None:
    """g = relu(CDF_p - CDF_q) / sum(g) on ``axis``: the stretch from the first entity towards the second.

    p, q are the normalised marginals of the entity first along the axis (``first_mask``)
    and of the other one. Entries at or below ZERO_TOL count as 0 (rounding noise of
    the cumulative sums); None when nothing is left, i.e. sum(g) = 0: the first entity
    is nowhere ahead of the second (for example boxes spanning the same stretch), so
    the relation metric is undefined.
    """
    first_mask, second_mask = np.asarray(first_mask, bool), np.asarray(second_mask, bool)
    if not first_mask.any() or not second_mask.any():
        raise ValueError("relation_target: both entity masks must be non-empty")
    p = _marginal(first_mask.astype(np.float64), axis) / first_mask.sum()
    q = _marginal(second_mask.astype(np.float64), axis) / second_mask.sum()
    d = np.cumsum(p) - np.cumsum(q)
    g = np.where(d > ZERO_TOL, d, 0.0)
    total = g.sum()
    return None if total == 0 else g / total


def relation_wasserstein(a: np.ndarray, g: np.ndarray, axis: str) -> float:
    """W1 (patches) between the relation map's marginal on ``axis`` and the target g (lower is better)."""
    (a,) = _check(a)
    marginal = _marginal(a, axis)
    g = np.asarray(g, dtype=np.float64)
    if g.shape != marginal.shape:
        raise ValueError(f"relation target has {g.shape[0]} cells, the map's {axis}-axis {marginal.shape[0]}")
    return _w1(marginal, g)


# --------------------------------------------------------------------------- seed maps

def seed_map(row: np.ndarray, s: int) -> np.ndarray | None:
    """Seed cell s's self-attention row (n,) with its own entry (the diagonal, row[s]) set to 0, renormalised.

    None when nothing is left after removing the diagonal (e.g. the first patch under a
    causal mask attends only to itself): there is no map to score.
    """
    row = np.array(row, dtype=np.float64)
    row[s] = 0.0
    total = row.sum()
    return None if total <= 0 else row / total


def entity_seed(mask: np.ndarray) -> int:
    """Raster index y * gw + x of the cell at the mask's centroid, rounded half to even
    (numpy's rint). The cell counts even where it lies outside the mask."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("entity_seed: empty mask")
    y, x = (int(np.rint(v)) for v in _centre(mask.astype(np.float64)))
    return y * mask.shape[1] + x


def background_seed(background_mask: np.ndarray, rng: np.random.Generator) -> int | None:
    """Raster index of a background cell drawn uniformly with ``rng``; None when there is none."""
    cells = np.flatnonzero(np.asarray(background_mask, dtype=bool))
    return None if cells.size == 0 else int(cells[rng.integers(cells.size)])


def distance_matched_specificity(rows: np.ndarray, cells: np.ndarray, own: np.ndarray, other: np.ndarray,
                                 background: np.ndarray, order: np.ndarray | None = None) -> float | None:
    """Binding specificity of a shape's self-attention that distance cannot produce. ``rows[i]``: the attention
    row (over the grid's cells in raster order) of cell ``cells[i]``, each a cell of ``own``. For every such seed,
    its map (``seed_map``: its own entry removed) is compared with itself at equal distance: the mass on a
    shape's cells, over the mass the background cells at the same squared distance from the seed hold per cell
    times the shape's cells there (only distances that hold both count). Pooled over the seeds:

        log(observed / expected on the own shape) - log(observed / expected on the other shape)

    A map that depends on the distance from its seed alone scores 0, as does one that multiplies every shape's
    cells alike (salience: a logit bonus under softmax); one that raises its own shape by a factor f scores
    log f. Every seed of the shape counts, because a seed at the shape's centre has no background as near as
    the shape's own cells: the cells near its edge do. ``order``: under a causal mask (a language model's), each
    cell's position in the sequence: a seed sees only the cells before it, and only those count; otherwise the
    cells the mask hides, all below a seed at a shape's top edge and none above it, would read as avoided. None
    where a shape shares no distance with the background."""
    own, other, background = (np.asarray(m, dtype=bool) for m in (own, other, background))
    gh, gw = own.shape
    y, x = np.divmod(np.arange(gh * gw), gw)
    totals = np.zeros((2, 2))  # [own, other] x [observed, expected]
    for row, cell in zip(np.asarray(rows, dtype=np.float64), np.asarray(cells)):
        a = seed_map(row, int(cell))
        if a is None:
            continue
        d2 = (y - y[cell]) ** 2 + (x - x[cell]) ** 2
        rings = int(d2.max()) + 1
        seen = np.arange(gh * gw) != cell if order is None else np.asarray(order) < np.asarray(order)[cell]
        bg = background.ravel() & seen
        bg_count = np.bincount(d2[bg], minlength=rings)
        bg_mean = np.bincount(d2[bg], weights=a[bg], minlength=rings) / np.maximum(bg_count, 1)
        bg_seen = bg_count > 0
        for k, shape in enumerate((own, other)):
            matched = shape.ravel() & seen & bg_seen[d2]
            totals[k] += (a[matched].sum(), bg_mean[d2[matched]].sum())
    if not (totals > 0).all():
        return None
    return float(np.log(totals[0, 0] / totals[0, 1]) - np.log(totals[1, 0] / totals[1, 1]))


# --------------------------------------------------------------------------- patch-shuffle baseline

def shuffle_patches(image: Image.Image, grid: int | tuple[int, int], seed: int) -> Image.Image:
    """The image cut into a gh x gw grid of equal tiles, permuted; same size and mode.

    Tile i (raster order) of the result is tile ``perm[i]`` of the input, with
    perm = np.random.default_rng(seed).permutation(gh * gw). When a side is not a
    multiple of the grid, the image is first resized (bicubic) up to the next multiple,
    so that no pixel is cropped, and the result is resized back; for the fed images
    of both models (336 px for a 24 x 24 grid, multiples of 28 px for Qwen2-VL) the
    sides divide evenly and the result is an exact permutation of pixels.
    """
    gh, gw = (grid, grid) if isinstance(grid, (int, np.integer)) else (int(grid[0]), int(grid[1]))
    width, height = image.size
    size = (-(-width // gw) * gw, -(-height // gh) * gh)
    work = image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)
    perm = np.random.default_rng(seed).permutation(gh * gw)
    pixels = np.asarray(work)  # (height, width[, channels]); the tiles moved as whole array blocks
    tiles = pixels.reshape(gh, pixels.shape[0] // gh, gw, pixels.shape[1] // gw, -1).swapaxes(1, 2)
    moved = tiles.reshape(gh * gw, *tiles.shape[2:])[perm].reshape(tiles.shape).swapaxes(1, 2)
    out = Image.fromarray(moved.reshape(pixels.shape))
    if out.mode != work.mode:  # a mode fromarray does not infer (P, PA, CMYK, YCbCr, LAB, HSV, RGBX): same bytes
        out = Image.frombytes(work.mode, work.size, out.tobytes())
    if work.mode in ("P", "PA"):  # indices into the same palette
        out.putpalette(work.getpalette())
    return out if out.size == image.size else out.resize(image.size, Image.Resampling.BICUBIC)
