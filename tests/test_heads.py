"""Head specialisation: top-k count cubes, corner patches, shared/unique heads,
the FDR ranking, the position-only flags and analyze_corner_heads.py end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spatial_attention.corner_analysis import load_corner_runs
from spatial_attention.errors import DataError, OptionError
from spatial_attention.heads import (CORNERS, corner_patch_indices, position_only_flags, rank_heads, shared_unique,
                                     top_cells, topk_count_cube)

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
    res = rank_heads(full, control, alpha=0.05, n_perm=2000, seed=0, layers=[4, 8, 12])
    assert [(s["layer"], s["head"]) for s in res["significant"]] == [(8, 2)]
    hit = res["significant"][0]
    assert hit["q"] < 0.05 and hit["mean_diff"] > 0.2 and hit["effect"] > 2
    assert res["p"].shape == res["q"].shape == res["effect"].shape == (3, 4)


def test_rank_heads_no_survivors_in_noise():
    full, control = _noise_scores(2)
    res = rank_heads(full, control, alpha=0.05, n_perm=2000, seed=0)
    assert res["significant"] == [] and not res["reject"].any()
    assert (res["q"] >= res["p"] - 1e-12).all()


# --- position-only control -----------------------------------------------------------

def test_position_only_flags():
    blank = np.linspace(0.10, 0.19, 10).reshape(2, 5, 1)
    blank[1, 3, 0] = 0.9                       # looks at the empty corner far more than the rest
    full = np.full((2, 5, 6), 0.5)
    res = position_only_flags(blank, full, percentile=95.0, layers=[3, 6])
    assert res["flags"].tolist() == [[False] * 5, [False, False, False, True, False]]
    assert [(f["layer"], f["head"]) for f in res["flagged"]] == [(6, 3)]
    assert res["flagged"][0]["blank_over_full"] == pytest.approx(1.8)
    assert "95th percentile" in res["rule"]
    # no head stands out: nothing flagged
    assert not position_only_flags(np.full((2, 5, 1), 0.3), full)["flags"].any()


# --- analyze_corner_heads.py end to end ----------------------------------------------------

def _write_run(folder: Path, corner: str, n_pairs: int, layers=(2, 4, 6), n_heads: int = 5, topk: int = 2,
               blank: bool = False, seed: int = 0) -> Path:
    """A synthetic head_attention_stats.py out-dir: head 0 and the corner's own head rise on the full image."""
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
    if blank:
        b = rng.uniform(0.1, 0.2, (len(layers), n_heads, 1)).astype(np.float32)
        b[0, 0, 0] = 0.6
        np.save(folder / "scores_blank_LHM.npy", b)
    meta = {"model": "tiny", "layers": list(layers), "H": n_heads, "N": n_pairs, "topk": topk,
            "prompt": f"Is there anything in the {corner} corner?", "corner": corner, "patch_size": 3,
            "versions": {}}
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
    proc = _cli(*corner_dirs, "--out-dir", out, "--n-perm", 500, "--diff-brightness", "abs")
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
    assert list(summary["position_only"]) == ["topleft"]
    flagged = summary["position_only"]["topleft"]["flagged"]
    assert [(f["layer"], f["head"]) for f in flagged] == [(2, 0)]
    flags = {(s["layer"], s["head"]): s["position_only"] for s in summary["significant_heads"]["topleft"]}
    assert flags[(2, 0)] is True and flags[(4, 0)] is False
    assert "shared head: 0" in (out / "shared_head.txt").read_text()
    assert (out / "top_pixels_shared.txt").read_text().count("\n") == 3 + 3


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
