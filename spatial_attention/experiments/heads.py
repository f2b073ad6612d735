"""Head specialisation in the corner experiments (metrics.md, "Head specialisation").

A head's score is the attention mass from the answer position to the image
tokens of one corner. For each pair (full image, control image without the
subject) and each layer, the top-k heads by |score(full) - score(control)| get a
1 in the count cube C[L, H, N]. Across the four corners:

    M_c        = mean over N of C_c          (use_scale="freq"; "count" = sum over N)
    M_shared   = mean over corners of M_c
    residual_c = M_c - M_shared
    shared head          = argmax_h reduce_layers(M_shared)[h]
    unique head of c     = argmax_h reduce_layers(residual_c)[h]

Conventions: arrays are [L, H, N] (layer, head, pair); heads are 0-based;
``layers`` is the list of 1-based layer numbers the L axis holds (meta.json's
``layers``). Ties always go to the lower index (head, then layer).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from spatial_attention.common.errors import OptionError
from spatial_attention.data.counterfactual import CORNERS
from spatial_attention.stats.inference import (benjamini_hochberg, paired_signflip_test, signflip_is_exact,
                                               signflip_method, signflip_min_permutations, signflip_p_floor)


def _check_cube_pair(full: np.ndarray, control: np.ndarray) -> None:
    if full.ndim != 3 or full.shape != control.shape:
        raise ValueError(f"full {full.shape} and control {control.shape} must both be [L, H, N]")


def _layer_numbers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(1, n_layers + 1))
    if len(layers) != n_layers:
        raise ValueError(f"{len(layers)} layer numbers for {n_layers} layers")
    return [int(x) for x in layers]


def topk_count_cube(full: np.ndarray, control: np.ndarray, topk: int) -> np.ndarray:
    """C[l, h, n] = 1 when head h is among the ``topk`` heads of layer l with the
    largest |full - control| for pair n (equal values: the lower head first), else 0."""
    full, control = np.asarray(full, dtype=np.float64), np.asarray(control, dtype=np.float64)
    _check_cube_pair(full, control)
    n_heads = full.shape[1]
    if not 1 <= topk <= n_heads:
        raise OptionError(f"--topk {topk}: must be between 1 and the number of heads ({n_heads})")
    order = np.argsort(-np.abs(full - control), axis=1, kind="stable")  # [L, H, N], best head first
    cube = np.zeros(full.shape, dtype=np.uint8)
    np.put_along_axis(cube, order[:, :topk, :], 1, axis=1)
    return cube


def corner_patch_indices(grid: tuple[int, int], corner: str, size: int | tuple[int, int]) -> np.ndarray:
    """Row-major indices (r * gw + c, ascending) of the block of image tokens in
    ``corner`` of a gh x gw token grid: size x size for an int (``--patch-size``),
    rows x cols for a (rows, cols) pair (the blank control's default corner quarter)."""
    gh, gw = grid
    if corner not in CORNERS:
        raise OptionError(f"--corner {corner!r} is not one of {', '.join(CORNERS)}")
    if isinstance(size, (int, np.integer)):
        if not 1 <= size <= min(gh, gw):
            raise OptionError(f"--patch-size {size}: must be between 1 and {min(gh, gw)} "
                              f"(the smaller side of the {gh}x{gw} image-token grid)")
        size = (size, size)
    n_rows, n_cols = size
    if not (1 <= n_rows <= gh and 1 <= n_cols <= gw):
        raise ValueError(f"a {n_rows}x{n_cols} corner block does not fit the {gh}x{gw} image-token grid")
    r0 = 0 if corner.startswith("top") else gh - n_rows
    c0 = 0 if corner.endswith("left") else gw - n_cols
    rows, cols = np.meshgrid(np.arange(r0, r0 + n_rows), np.arange(c0, c0 + n_cols), indexing="ij")
    return (rows * gw + cols).ravel()


def reduce_layers(matrix: np.ndarray, reduce_level: str) -> np.ndarray:
    """[L, H] -> [H]: the max or the mean over layers."""
    if reduce_level == "max":
        return matrix.max(axis=0)
    if reduce_level == "mean":
        return matrix.mean(axis=0)
    raise OptionError(f"--reduce-level {reduce_level!r} is not one of max, mean")


def shared_unique(cubes: Mapping[str, np.ndarray], reduce_level: str = "max", use_scale: str = "freq",
                  layers: Sequence[int] | None = None) -> dict:
    """Shared and per-corner unique heads from the count cubes {corner: uint8 [L, H, N_c]}.

    use_scale "freq": M_c = mean over the pairs = the fraction of pairs in which the
    head is among its layer's top-k, in [0, 1]; corners with different N weigh the
    same. "count": M_c = sum over the pairs = the number of such pairs; a corner
    with more pairs weighs more in M_shared.

    Returns M {corner: [L, H]}, M_shared [L, H], residual {corner: [L, H]}, the
    layer-reduced profiles ([H]), the chosen heads (0-based) and the layer
    (1-based, from ``layers``) where each chosen head's matrix peaks.
    """
    if not cubes:
        raise ValueError("no count cubes given")
    unknown = sorted(set(cubes) - set(CORNERS))
    if unknown:
        raise ValueError(f"unknown corners {unknown}; expected {', '.join(CORNERS)}")
    shapes = {c: np.shape(cube)[:2] for c, cube in cubes.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"count cubes differ in [L, H]: {shapes}")
    if use_scale not in ("freq", "count"):
        raise OptionError(f"--use-scale {use_scale!r} is not one of count, freq")
    corners = [c for c in CORNERS if c in cubes]
    reduce = np.mean if use_scale == "freq" else np.sum
    M = {c: reduce(np.asarray(cubes[c], dtype=np.float64), axis=-1) for c in corners}
    M_shared = np.mean([M[c] for c in corners], axis=0)
    residual = {c: M[c] - M_shared for c in corners}
    layer_numbers = _layer_numbers(layers, M_shared.shape[0])

    def pick(matrix: np.ndarray) -> tuple[np.ndarray, int, int]:
        profile = reduce_layers(matrix, reduce_level)
        head = int(np.argmax(profile))
        return profile, head, layer_numbers[int(np.argmax(matrix[:, head]))]

    shared_profile, shared_head, shared_layer = pick(M_shared)
    unique = {c: pick(residual[c]) for c in corners}
    return {"corners": corners, "layers": layer_numbers, "reduce_level": reduce_level, "use_scale": use_scale,
            "M": M, "M_shared": M_shared, "residual": residual,
            "shared_profile": shared_profile, "shared_head": shared_head, "shared_layer": shared_layer,
            "unique_profile": {c: u[0] for c, u in unique.items()},
            "unique_heads": {c: u[1] for c, u in unique.items()},
            "unique_layers": {c: u[2] for c, u in unique.items()}}


def top_cells(matrix: np.ndarray, k: int, by_abs: bool = False) -> list[tuple[int, int, float]]:
    """The k largest cells of an [L, H] matrix (by |value| when ``by_abs``) as
    (layer_index 0-based, head, signed value), largest first; equal values: the
    lower row-major index first."""
    if k < 0:
        raise ValueError(f"k must be non-negative, got {k}")
    matrix = np.asarray(matrix, dtype=np.float64)
    key = np.abs(matrix) if by_abs else matrix
    order = np.argsort(-key.ravel(), kind="stable")[:k]
    return [(int(i // matrix.shape[1]), int(i % matrix.shape[1]), float(matrix.flat[i])) for i in order]


def signflip_permutations(n_pairs: int, n_heads: int, alpha: float, n_perm: int | None) -> int:
    """The n_perm for rank_heads' sign-flip test of ``n_pairs`` pairs over ``n_heads`` heads.

    None gives the minimum, ceil(20 * n_heads / alpha) (stats.signflip_min_permutations): the
    Monte Carlo p floor then lies 20x below BH's smallest threshold alpha / n_heads, so the
    number of sign vectors never decides which heads survive; when 2**n_pairs is no more than
    that, the test enumerates every sign vector instead. An explicit value below the minimum
    is refused unless it already makes the test exact.
    """
    minimum = signflip_min_permutations(n_heads, alpha)
    if n_perm is None:
        return minimum
    if n_perm < minimum and not signflip_is_exact(n_pairs, n_perm):
        raise OptionError(f"--n-perm {n_perm}: below the minimum {minimum} = ceil(20 x {n_heads} heads / alpha "
                          f"{alpha:g}) random sign vectors, too coarse for Benjamini-Hochberg over {n_heads} heads; "
                          "leave it out for the automatic value")
    return n_perm


def rank_heads(full: np.ndarray, control: np.ndarray, alpha: float = 0.05, n_perm: int | None = None,
               seed: int = 0, layers: Sequence[int] | None = None) -> dict:
    """Which heads attend more (or less) to the corner when the subject is there.

    Per (layer, head): a two-sided paired sign-flip test of full vs control over
    the N pairs, then Benjamini-Hochberg over all L x H heads at level ``alpha``.
    ``n_perm`` None picks the number of sign vectors from the number of heads (see
    signflip_permutations); the result names the method and its p floor.
    effect = mean(diff) / sd(diff) (sd with ddof=1; NaN when sd is 0 or N < 2).
    ``significant`` lists the surviving heads, sorted by q, then by |effect|
    (largest first), then by layer and head.
    """
    full, control = np.asarray(full, dtype=np.float64), np.asarray(control, dtype=np.float64)
    _check_cube_pair(full, control)
    if not 0 < alpha < 1:
        raise OptionError(f"--alpha {alpha}: must lie strictly between 0 and 1")
    layer_numbers = _layer_numbers(layers, full.shape[0])
    diff = full - control
    n_pairs = diff.shape[-1]
    n_tested = int(np.isfinite(diff).all(axis=-1).sum())  # heads with a p-value: BH's m
    n_perm = signflip_permutations(n_pairs, n_tested, alpha, n_perm)
    mean_diff = diff.mean(axis=-1)
    sd = diff.std(axis=-1, ddof=1) if n_pairs > 1 else np.zeros_like(mean_diff)
    with np.errstate(divide="ignore", invalid="ignore"):
        effect = np.where(sd > 0, mean_diff / np.where(sd > 0, sd, 1.0), np.nan)
    p = np.asarray(paired_signflip_test(np.moveaxis(full, -1, 0), np.moveaxis(control, -1, 0),
                                        n_perm=n_perm, seed=seed), dtype=np.float64)
    q, reject = benjamini_hochberg(p, alpha=alpha)
    abs_effect = np.nan_to_num(np.abs(effect), nan=-1.0)  # a NaN effect sorts last among equal q
    survivors = sorted(zip(*np.nonzero(reject)), key=lambda lh: (q[lh], -abs_effect[lh], lh[0], lh[1]))
    significant = [{"layer": layer_numbers[l], "head": int(h), "q": float(q[l, h]), "p": float(p[l, h]),
                    "mean_diff": float(mean_diff[l, h]), "effect": float(effect[l, h])} for l, h in survivors]
    return {"p": p, "q": q, "reject": reject, "mean_diff": mean_diff, "effect": effect,
            "alpha": alpha, "n_perm": n_perm, "seed": seed, "n_tested": n_tested,
            "exact": signflip_is_exact(n_pairs, n_perm), "p_floor": signflip_p_floor(n_pairs, n_perm),
            "p_method": signflip_method(n_pairs, n_perm), "significant": significant}


def position_only_flags(blank_block: np.ndarray, blank_image: np.ndarray, area_share: float,
                        percentile: float = 95.0, layers: Sequence[int] | None = None) -> dict:
    """The position-only control: flag heads that favour the corner on an empty picture.

    ``blank_block`` and ``blank_image`` [L, H, M] hold each head's attention mass on
    the corner block and on all image tokens for M images of the data set's
    background colour alone (usually M = 1). A head's blank corner share = mean
    block mass / mean image mass says where on the empty picture it looks, however
    much it looks at the picture at all. ``area_share`` = the block's share of the
    image tokens (rows * cols / (gh * gw)), the share of a head that spreads its
    image mass evenly. Rule: a head is flagged when its share lies strictly above
    the ``percentile``-th percentile (linear interpolation) of all heads' shares
    AND above ``area_share``. A head with no image mass has no share (NaN): never
    flagged, and left out of the percentile.
    """
    block, image = np.asarray(blank_block, dtype=np.float64), np.asarray(blank_image, dtype=np.float64)
    if block.ndim != 3 or block.shape != image.shape or block.shape[-1] < 1:
        raise ValueError(f"blank block {block.shape} and blank image {image.shape} scores must both be "
                         "[L, H, M] with M >= 1")
    if not 0 < area_share <= 1:
        raise ValueError(f"area_share {area_share}: the block's share of the image tokens lies in (0, 1]")
    if not 0 <= percentile <= 100:
        raise OptionError(f"--blank-percentile {percentile}: must lie between 0 and 100")
    layer_numbers = _layer_numbers(layers, block.shape[0])
    block_mean, image_mean = block.mean(axis=-1), image.mean(axis=-1)
    share = np.divide(block_mean, image_mean, out=np.full_like(block_mean, np.nan), where=image_mean > 0)
    defined = share[np.isfinite(share)]
    threshold = float(np.percentile(defined, percentile)) if defined.size else float("nan")
    flags = (share > threshold) & (share > area_share)  # a NaN share compares False: never flagged
    flagged = [{"layer": layer_numbers[l], "head": int(h), "share": float(share[l, h]),
                "block": float(block_mean[l, h]), "image": float(image_mean[l, h])}
               for l, h in zip(*np.nonzero(flags))]
    rule = (f"position-only: on the blank background image, the head's corner share (attention mass on the "
            f"corner block / mass on all image tokens) > {threshold:.4g}, the {percentile:g}th percentile of all "
            f"{defined.size} heads' shares, and > {area_share:.4g}, the block's share of the image tokens (even "
            f"spreading); M = {block.shape[-1]} blank runs")
    return {"flags": flags, "share": share, "block": block_mean, "image": image_mean, "area_share": area_share,
            "threshold": threshold, "percentile": percentile, "rule": rule, "flagged": flagged}
