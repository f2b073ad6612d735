"""The Figure-API plots of spatial_attention.run.figures: each writes a valid PNG of the
original size and dpi, and none touches pyplot's global state."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt  # only to check that no pyplot figure is left open
import numpy as np
import pytest
from PIL import Image

from spatial_attention.run.figures import plot_asymmetry, plot_count_bars, plot_example_pair

REPO = Path(__file__).resolve().parents[1]
RELATIONS = ("left", "right", "above", "below")


def _record(k: int, rng: np.random.Generator, layers: list[int]) -> dict:
    """A pair record as text_analysis.pair_record writes it (small attention masses)."""
    r = {f"r_to_{e}_{tag}": float(rng.uniform(1e-3, 2e-2)) for tag in ("s1", "s2") for e in ("e1", "e2")}
    r["asym_s1"] = r["r_to_e1_s1"] - r["r_to_e2_s1"]
    r["asym_s2"] = r["r_to_e1_s2"] - r["r_to_e2_s2"]
    r["symmetry_score"] = r["asym_s1"] + r["asym_s2"]
    return {"shard": k // 5, "index": k, "relation": RELATIONS[k % 4], "e1": "red square", "e2": "blue circle",
            **r, "layers": layers,
            "layer_asym_s1": rng.normal(0, 5e-3, len(layers)).tolist(),
            "layer_asym_s2": rng.normal(0, 5e-3, len(layers)).tolist()}


@pytest.fixture
def records() -> list[dict]:
    rng = np.random.default_rng(0)
    layers = [3, 1, 2, 4, 5, 6, 7, 8]  # unsorted on purpose: the profile sorts by layer
    return [_record(k, rng, layers) for k in range(12)]


def _profile(records: list[dict]) -> dict:
    return {"layers": records[0]["layers"],
            "asym_s1": np.mean([r["layer_asym_s1"] for r in records], axis=0).tolist(),
            "asym_s2": np.mean([r["layer_asym_s2"] for r in records], axis=0).tolist()}


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # decodes the whole file: fails on a truncated one
        return image.size


@pytest.fixture(autouse=True)
def no_pyplot_figures():
    assert plt.get_fignums() == []
    yield
    assert plt.get_fignums() == []


def test_plot_asymmetry_writes_three_pngs(tmp_path, records):
    fig_dir = tmp_path / "out" / "figures"  # created by the function
    plot_asymmetry(fig_dir, records, _profile(records))
    assert sorted(p.name for p in fig_dir.iterdir()) == [
        "asym_scatter.png", "example_pair_bars.png", "layer_asym_profile.png"]  # no temporary files left
    # figsize (inches) x dpi 120, as the pyplot original
    assert _png_size(fig_dir / "asym_scatter.png") == (660, 780)
    assert _png_size(fig_dir / "example_pair_bars.png") == (780, 480)
    assert _png_size(fig_dir / "layer_asym_profile.png") == (780, 456)


def test_plot_asymmetry_single_layer_single_relation(tmp_path, records):
    one = [dict(r, relation="above", layers=[12], layer_asym_s1=[1e-3], layer_asym_s2=[-2e-3]) for r in records[:1]]
    plot_asymmetry(tmp_path, one, _profile(one))
    assert len(list(tmp_path.glob("*.png"))) == 3


def test_plot_asymmetry_empty_records_writes_nothing(tmp_path):
    fig_dir = tmp_path / "figures"
    plot_asymmetry(fig_dir, [], {})
    assert fig_dir.is_dir()
    assert list(fig_dir.iterdir()) == []


@pytest.mark.parametrize("relation", RELATIONS)
def test_plot_example_pair(tmp_path, records, relation):
    path = tmp_path / "example.png"
    plot_example_pair(path, dict(records[0], relation=relation))
    assert _png_size(path) == (780, 480)


def test_plot_example_pair_all_zero(tmp_path, records):
    zero = dict(records[0], r_to_e1_s1=0.0, r_to_e2_s1=0.0, r_to_e1_s2=0.0, r_to_e2_s2=0.0,
                asym_s1=0.0, asym_s2=0.0, symmetry_score=0.0)
    plot_example_pair(tmp_path / "zero.png", zero)
    assert _png_size(tmp_path / "zero.png") == (780, 480)


@pytest.mark.parametrize("shape, size", [((28, 28), (1936, 748)),  # 8 x 4 panels, 4 left empty
                                         ((3, 4), (726, 187))])     # one row of 3
def test_plot_count_bars(tmp_path, shape, size):
    rng = np.random.default_rng(1)
    count_lh = rng.integers(0, 50, size=shape)
    layer_numbers = list(range(1, shape[0] + 1))
    path = tmp_path / "count_bars.png"
    plot_count_bars(path, count_lh, layer_numbers, "top_left", 3)
    assert _png_size(path) == size  # figsize x dpi 110
    assert [p.name for p in tmp_path.iterdir()] == ["count_bars.png"]


def test_figures_never_load_pyplot(tmp_path):
    """In a fresh interpreter, drawing every figure leaves pyplot unimported."""
    code = f"""
import sys
import numpy as np
from pathlib import Path
from spatial_attention.run.figures import plot_asymmetry, plot_count_bars
out = Path({str(tmp_path)!r})
rec = {{"shard": 0, "index": 1, "relation": "left", "e1": "red square", "e2": "blue circle",
       "r_to_e1_s1": 0.02, "r_to_e2_s1": 0.01, "r_to_e1_s2": 0.01, "r_to_e2_s2": 0.015,
       "asym_s1": 0.01, "asym_s2": -0.005, "symmetry_score": 0.005,
       "layers": [1, 2], "layer_asym_s1": [0.01, 0.0], "layer_asym_s2": [-0.01, 0.002]}}
plot_asymmetry(out, [rec], {{"layers": [1, 2], "asym_s1": [0.01, 0.0], "asym_s2": [-0.01, 0.002]}})
plot_count_bars(out / "count_bars.png", np.ones((3, 4)), [1, 2, 3], "top_left", 3)
assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
    assert len(list(tmp_path.glob("*.png"))) == 4


def test_figures_source_has_no_pyplot():
    source = (REPO / "spatial_attention" / "run" / "figures.py").read_text()
    assert "import matplotlib.pyplot" not in source and "from matplotlib import pyplot" not in source
    assert "matplotlib.use" not in source


def test_figures_get_a_plain_files_mode(tmp_path):
    """Was: 0600, the temporary file's mode, on every PNG."""
    old = os.umask(0o022)
    try:
        plot_count_bars(tmp_path / "bars.png", np.ones((3, 4)), [1, 2, 3], "topleft", 1)
    finally:
        os.umask(old)
    assert (tmp_path / "bars.png").stat().st_mode & 0o777 == 0o644
