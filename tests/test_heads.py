"""Head specialisation: top-k count cubes, corner patches, shared/unique heads,
the FDR ranking, the position-only flags and analyze_corner_heads.py end to end."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spatial_attention.common.errors import DataError, OptionError
from spatial_attention.experiments.corner_analysis import analyze
from spatial_attention.experiments.corner_results import load_corner_runs
from spatial_attention.experiments.heads import (CORNERS, corner_patch_indices, position_only_flags, rank_heads,
                                                 shared_unique, top_cells, topk_count_cube)

REPO = Path(__file__).resolve().parents[1]
UNIQUE = {"topleft": 1, "topright": 2, "bottomleft": 3, "bottomright": 4}


# --- top-k count cube -------------------------------------------------------

def test_topk_count_cube_with_ties():
    # full [L=2, H=4, N=2], control 0: diff = full
    full = np.zeros((2, 4, 2))
    full[0, :, 0] = [0.1, -0.5, 0.5, 0.2]   # |diff| tie between heads 1 and 2
    full[0, :, 1] = [0.3, 0.3, 0.3, 0.3]    # all equal
    full[1, :, 0] = [0.0, 0.0, 0.0, 1.0]    # one clear winner, then zeros
    full[1, :, 1] = [-2.0, 1.0, 1.0, 0.0]   # sign does not matter
    control = np.zeros_like(full)

    top1 = topk_count_cube(full, control, 1)
    assert top1.dtype == np.uint8 and top1.shape == (2, 4, 2)
    assert top1[0, :, 0].tolist() == [0, 1, 0, 0]
    assert top1[0, :, 1].tolist() == [1, 0, 0, 0]
    assert top1[1, :, 0].tolist() == [0, 0, 0, 1]
    assert top1[1, :, 1].tolist() == [1, 0, 0, 0]

    top2 = topk_count_cube(full, control, 2)
    assert top2[0, :, 0].tolist() == [0, 1, 1, 0]
    assert top2[0, :, 1].tolist() == [1, 1, 0, 0]
    assert top2[1, :, 0].tolist() == [1, 0, 0, 1]
    assert top2[1, :, 1].tolist() == [1, 1, 0, 0]
    assert (top2.sum(axis=1) == 2).all()
    assert top2.sum(-1).tolist() == [[1, 2, 1, 0], [2, 1, 0, 1]]  # count_LH

    # the difference is what counts, not the level
    assert (topk_count_cube(full + 5.0, control + 5.0, 2) == top2).all()


@pytest.mark.parametrize("topk", [0, 5])
def test_topk_count_cube_rejects_bad_topk(topk):
    with pytest.raises(OptionError, match="--topk"):
        topk_count_cube(np.zeros((1, 4, 2)), np.zeros((1, 4, 2)), topk)


# --- corner patches -----------------------------------------------------------

def _in_corner(r: int, c: int, gh: int, gw: int, corner: str, p: int) -> bool:
    top, left = r < p, c < p
    bottom, right = r >= gh - p, c >= gw - p
    return {"topleft": top and left, "topright": top and right,
            "bottomleft": bottom and left, "bottomright": bottom and right}[corner]


@pytest.mark.parametrize("grid", [(6, 6), (17, 23)])
@pytest.mark.parametrize("corner", CORNERS)
def test_corner_patch_indices_cell_by_cell(grid, corner):
    gh, gw = grid
    idx = corner_patch_indices(grid, corner, 3)
    assert len(idx) == 9 and list(idx) == sorted(idx)
    chosen = set(idx.tolist())
    for r in range(gh):
        for c in range(gw):
            assert (r * gw + c in chosen) == _in_corner(r, c, gh, gw, corner, 3), (r, c)


def test_corner_patch_indices_literal_values():
    assert corner_patch_indices((17, 23), "topleft", 3).tolist() == [0, 1, 2, 23, 24, 25, 46, 47, 48]
    assert corner_patch_indices((17, 23), "topright", 2).tolist() == [21, 22, 44, 45]
    assert corner_patch_indices((17, 23), "bottomleft", 2).tolist() == [15 * 23, 15 * 23 + 1, 16 * 23, 16 * 23 + 1]
    assert corner_patch_indices((17, 23), "bottomright", 1).tolist() == [17 * 23 - 1]
    assert corner_patch_indices((24, 24), "bottomright", 24).tolist() == list(range(576))


@pytest.mark.parametrize("patch_size", [0, -1, 18])
def test_corner_patch_indices_rejects_bad_patch_size(patch_size):
    with pytest.raises(OptionError) as err:
        corner_patch_indices((17, 23), "topleft", patch_size)
    assert "--patch-size" in str(err.value) and "\n" not in str(err.value)


def test_corner_patch_indices_rejects_unknown_corner():
    with pytest.raises(OptionError, match="--corner"):
        corner_patch_indices((24, 24), "middle", 3)


def test_corner_patch_indices_rows_by_cols_block():
    # the blank control's default block is the corner quarter: gh // 2 rows x gw // 2 cols
    assert corner_patch_indices((5, 6), "topleft", (2, 3)).tolist() == [0, 1, 2, 6, 7, 8]
    assert corner_patch_indices((5, 6), "topright", (2, 3)).tolist() == [3, 4, 5, 9, 10, 11]
    assert corner_patch_indices((5, 6), "bottomright", (2, 3)).tolist() == [21, 22, 23, 27, 28, 29]
    assert corner_patch_indices((5, 6), "bottomleft", (1, 6)).tolist() == [24, 25, 26, 27, 28, 29]
    with pytest.raises(ValueError, match="does not fit"):
        corner_patch_indices((5, 6), "topleft", (6, 1))


# --- shared / unique ------------------------------------------------------------

def _planted_cubes() -> dict[str, np.ndarray]:
    """L=2, H=5, N=4. Layer 0: the corner's own head in every pair, head 0 in pairs 0-1;
    layer 1: head 0 in every pair, the corner's own head in pair 0."""
    cubes = {}
    for corner, u in UNIQUE.items():
        cube = np.zeros((2, 5, 4), dtype=np.uint8)
        cube[0, u, :] = 1
        cube[0, 0, :2] = 1
        cube[1, 0, :] = 1
        cube[1, u, 0] = 1
        cubes[corner] = cube
    return cubes


def test_shared_unique_planted():
    res = shared_unique(_planted_cubes(), "max", "freq", layers=[7, 9])
    assert res["corners"] == list(CORNERS)
    np.testing.assert_allclose(res["M_shared"][:, 0], [0.5, 1.0])
    np.testing.assert_allclose(res["M_shared"][:, 1:], [[0.25] * 4, [0.0625] * 4])
    assert res["shared_head"] == 0 and res["shared_layer"] == 9
    assert res["unique_heads"] == UNIQUE
    assert res["unique_layers"] == {c: 7 for c in CORNERS}
    np.testing.assert_allclose(res["residual"]["topleft"][0], [0.0, 0.75, -0.25, -0.25, -0.25])
    np.testing.assert_allclose(sum(res["residual"].values()), 0.0, atol=1e-12)

    mean = shared_unique(_planted_cubes(), "mean", "freq")
    assert mean["shared_head"] == 0 and mean["unique_heads"] == UNIQUE and mean["shared_layer"] == 2

    count = shared_unique(_planted_cubes(), "max", "count")
    np.testing.assert_allclose(count["M_shared"], res["M_shared"] * 4)
    assert count["unique_heads"] == UNIQUE


def test_shared_unique_reduce_level_decides():
    # head 1: every pair in layer 0 only; head 2: 3 of 5 pairs in every layer
    cube = np.zeros((4, 3, 5), dtype=np.uint8)
    cube[0, 1, :] = 1
    cube[:, 2, :3] = 1
    cubes = {c: cube for c in CORNERS}
    assert shared_unique(cubes, "max")["shared_head"] == 1
    assert shared_unique(cubes, "mean")["shared_head"] == 2


def test_shared_unique_rejects_mismatched_cubes():
    cubes = _planted_cubes()
    cubes["topright"] = np.zeros((3, 5, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="differ"):
        shared_unique(cubes)


def test_top_cells():
    m = np.array([[1.0, 3.0], [3.0, -5.0]])
    assert top_cells(m, 2) == [(0, 1, 3.0), (1, 0, 3.0)]
    assert top_cells(m, 2, by_abs=True) == [(1, 1, -5.0), (0, 1, 3.0)]
    assert len(top_cells(m, 10)) == 4 and top_cells(m, 0) == []


# --- FDR ranking --------------------------------------------------------------------

def _noise_scores(seed: int, shape=(3, 4, 30)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    control = rng.normal(0.5, 0.1, shape)
    return control + rng.normal(0.0, 0.1, shape), control


def test_rank_heads_finds_planted_effect():
    full, control = _noise_scores(1)
    full[1, 2] += 0.3
    res = rank_heads(full, control, alpha=0.05, seed=0, layers=[4, 8, 12])
    assert [(s["layer"], s["head"]) for s in res["significant"]] == [(8, 2)]
    hit = res["significant"][0]
    assert hit["q"] < 0.05 and hit["mean_diff"] > 0.2 and hit["effect"] > 2
    assert res["p"].shape == res["q"].shape == res["effect"].shape == (3, 4)


def test_rank_heads_no_survivors_in_noise():
    full, control = _noise_scores(2)
    res = rank_heads(full, control, alpha=0.05, seed=0)
    assert res["significant"] == [] and not res["reject"].any()
    assert (res["q"] >= res["p"] - 1e-12).all()


# the 7B head grids: Qwen2-VL-7B has 28 x 28 heads, LLaVA-1.5-7B 32 x 32; 100 pairs per corner
PLANTED = {(2, 5): 0.05, (9, 0): -0.06, (14, 27): 0.07, (20, 13): 0.08, (27, 3): -0.10}


def test_rank_heads_finds_planted_heads_among_7b_heads():
    # diff noise sd 0.1 per pair, planted shifts of 0.5-1 sd: |t| about 5-10 over 100 pairs. With
    # 2000 random sign vectors (the old default) every p >= 1/2001, above BH's threshold 5 x 0.05 / 784
    # for five heads, so none was found; the automatic n_perm puts the floor at 0.05 / (20 x 784)
    full, control = _noise_scores(7, shape=(28, 28, 100))
    for (layer, head), shift in PLANTED.items():
        full[layer, head] += shift
    res = rank_heads(full, control, alpha=0.05, seed=0)
    assert res["n_perm"] == 313600 and not res["exact"] and res["p_floor"] == 1 / 313601
    found = {(s["layer"] - 1, s["head"]) for s in res["significant"]}
    assert set(PLANTED) <= found and len(found - set(PLANTED)) <= 1
    keys = [(s["q"], -abs(s["effect"])) for s in res["significant"]]
    assert keys == sorted(keys)  # by q, then |effect| largest first


def test_rank_heads_null_among_7b_heads():
    full, control = _noise_scores(8, shape=(28, 28, 100))
    res = rank_heads(full, control, alpha=0.05, seed=0)
    assert res["significant"] == [] and res["p"].min() > 0.05 / 784


def test_rank_heads_equal_q_ranked_by_abs_effect():
    # three heads far beyond every sign vector share the p floor, hence one q; a decrease counts by |effect|
    full, control = _noise_scores(3, shape=(4, 5, 30))
    full[0, 1] += 0.2
    full[2, 3] -= 1.0
    full[3, 0] += 0.5
    res = rank_heads(full, control, alpha=0.05, seed=0)
    sig = res["significant"]
    assert [(s["layer"], s["head"]) for s in sig] == [(3, 3), (4, 0), (1, 1)]
    assert len({s["q"] for s in sig}) == 1 and sig[0]["effect"] < 0
    assert abs(sig[0]["effect"]) > abs(sig[1]["effect"]) > abs(sig[2]["effect"])


def test_rank_heads_n_perm_minimum_and_method():
    full, control = _noise_scores(4)  # 12 heads, 30 pairs: minimum ceil(20 x 12 / 0.05) = 4800
    auto = rank_heads(full, control)
    assert auto["n_perm"] == 4800 and not auto["exact"]
    assert auto["p_method"] == ("sign-flip, Monte Carlo with n_perm = 4800 random sign vectors, "
                                "p >= 1/(n_perm+1)") and auto["p_floor"] == 1 / 4801
    with pytest.raises(OptionError, match="--n-perm 2000: below the minimum 4800"):
        rank_heads(full, control, n_perm=2000)
    assert rank_heads(full, control, n_perm=6000)["n_perm"] == 6000
    # 10 pairs: 2^10 = 1024 sign vectors are enumerated, so a small n_perm that covers them is fine
    small = rank_heads(full[..., :10], control[..., :10], n_perm=1024)
    assert small["exact"] and small["p_floor"] == 2 / 1024
    assert small["p_method"] == "sign-flip, exact over all 2^10 = 1024 sign vectors, p >= 2/2^10"
    assert rank_heads(full[..., :10], control[..., :10])["exact"]  # auto 4800 >= 1024


# --- position-only control -----------------------------------------------------------

def test_position_only_flags_corner_share_not_image_mass():
    # blank-image mass [L=2, H=5, M=1] of heads that spread it about evenly, a 2 x 2 block of a
    # 4 x 4 grid (area share 1/4) getting 22-28% of it
    image = np.full((2, 5, 1), 0.30)
    block = image * np.linspace(0.22, 0.28, 10).reshape(2, 5, 1)
    image[0, 1, 0], block[0, 1, 0] = 0.95, 0.95 * 0.25  # looks at the picture most, but evenly: not flagged
    image[1, 3, 0], block[1, 3, 0] = 0.20, 0.16  # little image mass, most of it in the corner: flagged
    res = position_only_flags(block, image, area_share=0.25, percentile=95.0, layers=[3, 6])
    assert res["flags"].tolist() == [[False] * 5, [False, False, False, True, False]]
    assert [(f["layer"], f["head"]) for f in res["flagged"]] == [(6, 3)]
    assert res["flagged"][0]["share"] == pytest.approx(0.8) and res["flagged"][0]["image"] == pytest.approx(0.2)
    assert res["share"][0, 1] == pytest.approx(0.25) and res["area_share"] == 0.25
    assert "95th percentile" in res["rule"] and "0.25" in res["rule"]


def test_position_only_flags_needs_more_than_even_spreading():
    # the top share is above the percentile, but below the block's area share: no head favours the corner
    image = np.full((2, 5, 1), 0.3)
    block = image * np.linspace(0.10, 0.20, 10).reshape(2, 5, 1)
    assert not position_only_flags(block, image, area_share=0.25)["flags"].any()
    # a head with no image mass has no share: never flagged, and not in the percentile
    res = position_only_flags(np.array([[[0.0], [0.3], [0.1]]]), np.array([[[0.0], [0.4], [0.4]]]),
                              area_share=0.25, percentile=50.0)
    assert res["flags"].tolist() == [[False, True, False]] and np.isnan(res["share"][0, 0])
    assert res["threshold"] == pytest.approx(0.5)


# --- analyze_corner_heads.py end to end ----------------------------------------------------

def _write_run(folder: Path, corner: str, n_pairs: int, layers=(2, 4, 6), n_heads: int = 5, topk: int = 2,
               blank: bool = False, seed: int = 0, model: str = "tiny", **settings) -> Path:
    """A synthetic head_attention_stats.py out-dir: head 0 and the corner's own head rise on the full image;
    ``settings`` replace meta.json's scoring settings."""
    rng = np.random.default_rng(seed)
    shape = (len(layers), n_heads, n_pairs)
    control = rng.uniform(0.1, 0.3, shape).astype(np.float32)
    full = control + rng.normal(0.0, 0.005, shape).astype(np.float32)
    full[:, 0] += 0.2
    full[:, UNIQUE[corner]] += 0.1
    folder.mkdir(parents=True)
    np.save(folder / "scores_full_LHN.npy", full)
    np.save(folder / "scores_control_LHN.npy", control)
    count = topk_count_cube(full, control, topk)
    np.save(folder / "count_LHN.npy", count)
    np.save(folder / "count_LH.npy", count.sum(-1))
    if blank:  # about a quarter of each head's blank image mass in the 2 x 2 block; head 0 of layer 1: 90%
        image = rng.uniform(0.3, 0.5, (len(layers), n_heads, 1)).astype(np.float32)
        block = image * rng.uniform(0.2, 0.3, image.shape).astype(np.float32)
        block[0, 0, 0] = 0.9 * image[0, 0, 0]
        np.save(folder / "scores_blank_LHM.npy", block)
        np.save(folder / "scores_blank_image_LHM.npy", image)
    meta = {"model": model, "model_path": f"{model}-checkpoint", "layers": list(layers), "H": n_heads, "N": n_pairs,
            "topk": topk, "prompt": f"Is there anything in the {corner} corner?", "corner": corner,
            "patch_size": 3, "feed_size": [224, 224], "max_new_tokens": 1, "dtype": "float32",
            "prompt_template": "Is there anything in the {corner} corner?", "versions": {}, **settings}
    if blank:
        meta["blank_block"] = {"corner": corner, "rows": 2, "cols": 2, "grid": [4, 4]}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def corner_dirs(tmp_path) -> list[Path]:
    n_pairs = {"topleft": 12, "topright": 12, "bottomleft": 14, "bottomright": 16}
    return [_write_run(tmp_path / f"run_{c}", c, n_pairs[c], blank=(c == "topleft"), seed=i)
            for i, c in enumerate(reversed(CORNERS))]


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "analyze_corner_heads.py"), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_end_to_end(corner_dirs, tmp_path):
    out = tmp_path / "count_shared_unique"
    proc = _cli(*corner_dirs, "--out-dir", out, "--diff-brightness", "abs")
    assert proc.returncode == 0, proc.stderr
    expected = ["heatmap_shared.png", "unique_head_curves.png", "shared_head.txt", "unique_heads.txt",
                "top_pixels_shared.txt", "summary.json"]
    expected += [f"heatmap_residual_{c}.png" for c in CORNERS] + [f"top_pixels_diff_{c}.txt" for c in CORNERS]
    for name in expected:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shared_head"] == 0 and summary["unique_heads"] == UNIQUE
    assert summary["N"] == {"topleft": 12, "topright": 12, "bottomleft": 14, "bottomright": 16}
    for corner in CORNERS:
        sig = summary["significant_heads"][corner]
        assert {s["head"] for s in sig} == {0, UNIQUE[corner]}
        assert {s["layer"] for s in sig} == {2, 4, 6}
        assert all(s["q"] < 0.05 and s["mean_diff"] > 0 for s in sig)
    assert all("withheld" in summary["position_only"][c] for c in CORNERS if c != "topleft")
    assert summary["position_only"]["topleft"]["area_share"] == 0.25
    flagged = summary["position_only"]["topleft"]["flagged"]
    assert [(f["layer"], f["head"]) for f in flagged] == [(2, 0)]
    flags = {(s["layer"], s["head"]): s["position_only"] for s in summary["significant_heads"]["topleft"]}
    assert flags[(2, 0)] is True and flags[(4, 0)] is False
    # 15 heads: automatic n_perm = ceil(20 x 15 / 0.05) = 6000 >= 2^12, so the 12-pair corners are exact
    fdr = summary["fdr"]
    assert fdr["n_perm"] == {"topleft": 6000, "topright": 6000, "bottomleft": 6000, "bottomright": 6000}
    assert fdr["p_method"]["topleft"] == "sign-flip, exact over all 2^12 = 4096 sign vectors, p >= 2/2^12"
    assert fdr["p_method"]["bottomright"].startswith("sign-flip, Monte Carlo with n_perm = 6000")
    assert fdr["p_floor"] == {"topleft": 2 / 4096, "topright": 2 / 4096, "bottomleft": 1 / 6001,
                              "bottomright": 1 / 6001}
    assert "shared head: 0" in (out / "shared_head.txt").read_text()
    assert (out / "top_pixels_shared.txt").read_text().count("\n") == 3 + 3


def test_position_only_withheld_for_old_folders(corner_dirs, tmp_path, caplog):
    # an out-dir from before the blank image was scored on the corner block holds only scores_blank_LHM.npy,
    # which could be the mass on every image token: one warning, and no flag for any corner
    (corner_dirs[-1] / "scores_blank_image_LHM.npy").unlink()  # the topleft folder, the one with a blank control
    with caplog.at_level(logging.WARNING, logger="spatial_attention"):
        summary = analyze(load_corner_runs(corner_dirs), tmp_path / "out")
    warnings = [r.getMessage() for r in caplog.records if "position-only flag withheld" in r.getMessage()]
    assert len(warnings) == 1 and all(c in warnings[0] for c in CORNERS)
    assert all("scores_blank_image_LHM.npy" in summary["position_only"][c]["withheld"] for c in CORNERS)
    assert not any("position_only" in s for sig in summary["significant_heads"].values() for s in sig)


def test_cli_help():
    proc = _cli("--help")
    assert proc.returncode == 0 and "--reduce-level" in proc.stdout and "unique head" in proc.stdout


def _assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_mismatched_heads(tmp_path):
    dirs = [_write_run(tmp_path / c, c, 12, n_heads=6 if c == "bottomleft" else 5, seed=i)
            for i, c in enumerate(CORNERS)]
    _assert_one_line_error(_cli(*dirs, "--out-dir", tmp_path / "out"), str(tmp_path / "bottomleft"))


def test_cli_mismatched_layers(tmp_path):
    dirs = [_write_run(tmp_path / c, c, 12, layers=(1, 2) if c == "topright" else (2, 4, 6), seed=i)
            for i, c in enumerate(CORNERS)]
    _assert_one_line_error(_cli(*dirs, "--out-dir", tmp_path / "out"), "layers")


def _floor_warnings(tmp_path: Path, n_pairs: int, caplog) -> tuple[list[str], dict]:
    dirs = [_write_run(tmp_path / c, c, n_pairs, seed=i) for i, c in enumerate(CORNERS)]
    with caplog.at_level(logging.WARNING, logger="spatial_attention"):
        summary = analyze(load_corner_runs(dirs), tmp_path / "out")
    return [r.getMessage() for r in caplog.records if "sign-flip p" in r.getMessage()], summary


def test_exact_floor_above_alpha_says_no_head_can_be_rejected(tmp_path, caplog):
    # 4 pairs: exact over 16 sign vectors, floor 2/16 = 0.125 > alpha: no head, however strong, is rejected
    # (BH would need 38 of the 15 heads at the floor); one head alone can be from 2 / 2^N <= 0.05 / 15, N = 10
    warnings, summary = _floor_warnings(tmp_path, 4, caplog)
    assert len(warnings) == 4 and warnings[0] == (
        "topleft: no head can be rejected with N = 4 pairs at alpha 0.05: the smallest sign-flip p, 0.125, is above "
        "alpha; Benjamini-Hochberg over 15 heads can reject a head on its own from 10 pairs on")
    assert summary["fdr"]["p_floor"]["topleft"] == 0.125 and summary["significant_heads"]["topleft"] == []


@pytest.mark.parametrize("n_pairs, heads", [(8, 3), (9, 2), (10, None)])
def test_exact_floor_above_bh_threshold_warns(tmp_path, caplog, n_pairs, heads):
    # 8 pairs: floor 2/256 > 0.05 / 15, BH needs ceil(2/256 x 15 / 0.05) = 3 heads at the floor; from 10 on, none
    warnings, _ = _floor_warnings(tmp_path, n_pairs, caplog)
    if heads is None:
        assert warnings == []
    else:
        assert len(warnings) == 4 and warnings[0].endswith(
            f"Benjamini-Hochberg over 15 heads rejects only if at least {heads} heads reach it")


def test_cli_refuses_too_few_permutations(corner_dirs, tmp_path):
    # 15 heads at alpha 0.05 need 6000; 500 would make every p >= 1/501 (the 14- and 16-pair corners sample)
    _assert_one_line_error(_cli(*corner_dirs, "--out-dir", tmp_path / "out", "--n-perm", 500),
                           "below the minimum 6000")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, value", [("model", "other"), ("patch_size", 4), ("topk", 3), ("feed_size", [336, 336]),
                                        ("max_new_tokens", 2), ("prompt_template", "Anything in the {corner}?"),
                                        ("dtype", "bfloat16")])
def test_cli_refuses_mixed_settings(tmp_path, key, value):
    # another model family, corner block, top-k, image size, answer length, question or precision in one
    # folder: refused, naming both folders, models and the differing values
    dirs = [_write_run(tmp_path / c, c, 12, seed=i, **({key: value} if c == "bottomleft" else {}))
            for i, c in enumerate(CORNERS)]
    proc = _cli(*dirs, "--out-dir", tmp_path / "out")
    _assert_one_line_error(proc, f"differ in {key}")
    for needle in (str(tmp_path / "topleft"), str(tmp_path / "bottomleft"), "model 'tiny'",
                   "model 'other'" if key == "model" else "model 'tiny'", f"{key} {value!r}"):
        assert needle in proc.stderr
    assert not (tmp_path / "out").exists()


def test_settings_compared_only_where_both_folders_record_them(tmp_path):
    # an out-dir from before meta.json recorded prompt_template and dtype goes with newer ones
    dirs = [_write_run(tmp_path / c, c, 12, seed=i) for i, c in enumerate(CORNERS)]
    meta_path = dirs[2] / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["prompt_template"], meta["dtype"]
    meta_path.write_text(json.dumps(meta))
    assert list(load_corner_runs(dirs)) == list(CORNERS)


def test_load_refuses_mixed_model_paths(tmp_path):
    dirs = [_write_run(tmp_path / c, c, 12, seed=i) for i, c in enumerate(CORNERS)]
    meta_path = dirs[3] / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model_path"] = "Qwen/Qwen2-VL-7B-Instruct"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"differ in model_path: .*one model"):
        load_corner_runs(dirs)


def test_cli_missing_file(corner_dirs, tmp_path):
    (corner_dirs[1] / "count_LHN.npy").unlink()
    _assert_one_line_error(_cli(*corner_dirs, "--out-dir", tmp_path / "out"), str(corner_dirs[1] / "count_LHN.npy"))
    assert not (tmp_path / "out").exists()


def test_duplicated_and_missing_corner(corner_dirs, tmp_path):
    dup = _write_run(tmp_path / "again", "topright", 12)
    with pytest.raises(DataError, match="both corner 'topright'"):
        load_corner_runs(corner_dirs + [dup])
    with pytest.raises(DataError, match="no folder for corner topleft"):
        load_corner_runs([d for d in corner_dirs if not d.name.endswith("topleft")])


def test_meta_shape_mismatch_names_file(corner_dirs):
    meta_path = corner_dirs[0] / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["N"] += 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="scores_full_LHN.npy: shape"):
        load_corner_runs(corner_dirs)
