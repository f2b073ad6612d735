"""The families beyond the paper's, on their tiny-random builds, with the guarantees the paper's two have:
Qwen2.5-VL (windowed ViT), LLaVA-OneVision and LLaVA-NeXT (anyres), InternVL3 (pixel-shuffle merge, tiles),
Qwen3-VL (DeepStack). The engine equals eager at batch sizes 1 and 3; the
image-token grid and layout are right; the ViT maps come out in raster order (a test that fails on window
order); the ablation's no-op is the plain model; the corner sweep runs with COUNT=6."""
from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch
from conftest import REPO, random_images
from test_capture import CAPTIONS, _assert_close, _request

from spatial_attention.engine.capture import CaptureRequest, capture, plain_logits
from spatial_attention.engine.reference import reference_capture
from spatial_attention.experiments.ablation_measure import HeadAblation, hooked_logits

NEW_FAMILIES = ["qwen2_5vl", "llava_onevision", "llava_next", "internvl3", "qwen3vl"]
# anyres: the family, its base view's grid side, and each sample's views for a square picture (base, crops)
ANYRES = [("llava_onevision", 27, [0, -1, 1, -1]), ("llava_next", 24, [0, -1, -1, 1, -1, -1])]


@pytest.fixture(scope="module")
def new_models():
    from models import load_adapter

    return {family: load_adapter(family, "tiny-random", device="cpu", dtype="fp32") for family in NEW_FAMILIES}


@pytest.fixture(params=NEW_FAMILIES)
def new_adapter(request, new_models):
    adapter = new_models[request.param]
    if request.param == "qwen2_5vl":
        adapter.set_feed_size(336)  # 12 x 12 tokens: 3 x 3 windows of 4 x 4 cells
    if request.param == "qwen3vl":
        adapter.set_feed_size(384)  # 12 x 12 tokens
    return adapter


@pytest.mark.parametrize("batch_size", [1, 3])
def test_engine_equals_eager(new_adapter, batch_size):
    batch = new_adapter.encode(CAPTIONS[:batch_size], random_images(batch_size))
    request = _request(batch, list(range(new_adapter.num_layers)))
    got, logits = capture(new_adapter, batch, request)
    want, _ = reference_capture(new_adapter, batch, request)
    _assert_close(got, want)
    assert torch.equal(logits, plain_logits(new_adapter, batch))


def test_ablation_no_op_is_the_plain_model(new_adapter):
    batch = new_adapter.encode(["Is there anything in the top left corner?", "Is there anything?"], random_images(2))
    assert batch.inputs["attention_mask"].min() == 0  # padded
    assert torch.equal(hooked_logits(new_adapter, batch, HeadAblation(new_adapter, [[]])),
                       plain_logits(new_adapter, batch))


def test_qwen2_5vl_grid_is_read_from_image_grid_thw(new_models):
    adapter = new_models["qwen2_5vl"]
    adapter.set_feed_size((448, 336))  # not square: rows and columns cannot be swapped unnoticed
    try:
        batch = adapter.encode(CAPTIONS[:1], random_images(1))
    finally:
        adapter.set_feed_size(336)
    layout = batch.layouts[0]
    assert batch.inputs["image_grid_thw"].tolist() == [[1, 32, 24]]
    assert layout.grid == (16, 12) and len(layout.image_positions) == 16 * 12
    ids = layout.input_ids
    assert np.all(ids[layout.image_positions] == adapter.model.config.image_token_id)
    assert np.array_equal(np.diff(layout.image_positions), np.ones(16 * 12 - 1))  # one contiguous raster block


@pytest.mark.parametrize("family, side, views", ANYRES)
def test_anyres_grid_is_the_base_view_and_never_a_newline(new_models, family, side, views):
    """The analysed positions hold, in raster order, the base view's projected patches: the first gh x gw
    features the model packs for the image; the crops and their image_newline tokens come after and are no
    cell."""
    adapter = new_models[family]
    batch = adapter.encode(CAPTIONS[:2], random_images(2))
    model, config = adapter.model.model, adapter.model.config
    inputs = batch.inputs
    extra = {"batch_num_images": inputs["batch_num_images"]} if "batch_num_images" in inputs else {}
    with torch.no_grad():
        packed = model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                          vision_feature_layer=config.vision_feature_layer,
                                          vision_feature_select_strategy=config.vision_feature_select_strategy,
                                          **extra).pooler_output
    newline, first = model.image_newline, int(config.vision_feature_select_strategy == "default")  # CLS dropped
    for b, layout in enumerate(batch.layouts):
        assert layout.grid == (side, side) and len(layout.image_positions) == side * side
        all_image = np.flatnonzero(layout.input_ids == config.image_token_id)
        assert len(all_image) == len(packed[b]) > side * side  # base view, then the crops with their newlines
        assert np.array_equal(layout.image_positions, all_image[: side * side])
        with torch.no_grad():
            features = model.vision_tower(inputs["pixel_values"][b, :1], output_hidden_states=True).hidden_states
            base = model.multi_modal_projector(features[config.vision_feature_layer][:, first:])[0]
        torch.testing.assert_close(packed[b][: side * side], base)  # the grid is the base view, raster order
        is_newline = (packed[b] == newline).all(-1)
        assert int(is_newline.sum()) > 0 and not bool(is_newline[: side * side].any())
    assert adapter.vision_views(inputs) == views  # per image: its base view, then its crops


def test_llava_next_base_view_is_the_picture_itself(new_models):
    """The centre-cropped 336 px picture is the base view pixel for pixel (only CLIP's normalisation between):
    each cell of the grid is one CLIP patch of the picture."""
    from models.llava_next import CLIP_MEAN, CLIP_STD

    adapter = new_models["llava_next"]
    image = random_images(1)[0]
    pixels = adapter.encode(CAPTIONS[:1], [image]).inputs["pixel_values"][0, 0].double().numpy()
    picture = np.asarray(adapter.prepare_image(image), dtype=np.float64) / 255.0
    np.testing.assert_allclose(pixels, ((picture - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1), atol=1e-5)


@pytest.mark.parametrize("family, side, views", [("llava_onevision", 27, [0, -1, -1, 1, -1]),
                                                 ("llava_next", 24, [0, -1, -1, 1, -1, -1])])
def test_anyres_vision_maps_are_each_sample_s_base_view(new_models, monkeypatch, family, side, views):
    """Raw pictures of two shapes, unframed: the wide one gets three views (its base view and two crops with other
    pixels), the square one its own base view and crops. The engine's map of each sample must be its base view's,
    computed here from the vision tower run on that view alone."""
    from PIL import Image

    from spatial_attention.engine.reference import eager_model

    adapter = new_models[family]
    monkeypatch.setattr(adapter, "prepare_image", lambda image: image.convert("RGB"))
    monkeypatch.setattr(adapter, "feed_image", lambda image: image)
    rng = np.random.default_rng(7)
    pixels_of = adapter.model.config.vision_config.image_size
    wide, square = (Image.fromarray((rng.random((pixels_of, w, 3)) * 255).astype("uint8"))
                    for w in (2 * pixels_of, pixels_of))
    batch = adapter.encode(CAPTIONS[:2], [wide, square])
    pixels = batch.inputs["pixel_values"]
    assert adapter.vision_views(batch.inputs) == views
    assert not torch.equal(pixels[0, 0], pixels[0, 1])  # the crops are not the base view
    cells = np.array([0, 13, side * side // 2, side * side - 1])
    got = _vision_maps(adapter, batch, cells)
    modules, rows = adapter.vision_attention_modules(), torch.as_tensor(adapter.vision_query_rows(cells))
    for b in range(2):
        with eager_model(adapter) as kept, torch.no_grad():
            adapter.model.model.vision_tower(pixels[b, :1])
            want = np.mean([adapter.vision_to_grid(kept[id(modules[layer])][-1][0].double().mean(0)[rows]).numpy()
                            for layer in adapter.vision_map_layers()], axis=0)
        np.testing.assert_allclose(got[b], want, rtol=0, atol=1e-6)


def _vision_maps(adapter, batch, cells):
    request = CaptureRequest(layers=[0], vision_cells=[cells] * len(batch))
    got, _ = capture(adapter, batch, request)
    return np.stack([sample["vision"] for sample in got])


def test_qwen2_5vl_vision_maps_come_out_in_raster_order():
    """Two builds with the same weights, every block full attention: the checkpoint's 112-px windows (the
    ViT works in window order) and one window over the whole image (window order = raster order). Both
    compute the same attention up to the order of the patches, so their raster maps must agree; read in window
    order, as a Qwen2-VL ViT is, they do not."""
    from models import Qwen2_5VLAdapter
    from models.qwen2vl import Qwen2VLAdapter

    full = dict(fullatt_block_indexes=[0, 1, 2, 3])
    torch.manual_seed(0)
    windowed = Qwen2_5VLAdapter(*Qwen2_5VLAdapter.build_random(vision=full), "tiny-random")
    torch.manual_seed(1)
    whole = Qwen2_5VLAdapter(*Qwen2_5VLAdapter.build_random(vision={**full, "window_size": 336 * 2}), "tiny-random")
    with torch.no_grad():  # sharp attention: random weights attend almost uniformly, to any order alike
        for block in windowed.model.model.visual.blocks:
            block.attn.qkv.weight *= 10
    whole.model.load_state_dict(windowed.model.state_dict())
    for adapter in (windowed, whole):
        adapter.set_feed_size(336)  # 12 x 12 cells, 3 x 3 windows
    cells = 12 * 12
    order = windowed.window_order()
    assert not np.array_equal(order, np.arange(cells))  # the windows reorder the cells,
    assert not np.array_equal(np.argsort(order), order)  # and not by a permutation that is its own inverse
    assert np.array_equal(whole.window_order(), np.arange(cells))
    captions, images = CAPTIONS[:2], random_images(2, seed=3)
    chosen = np.array([0, 5, 17, 100, 143])
    got = _vision_maps(windowed, windowed.encode(captions, images), chosen)
    want = _vision_maps(whole, whole.encode(captions, images), chosen)
    assert got.shape == (2, len(chosen), cells)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(plain_logits(windowed, windowed.encode(captions, images)),
                               plain_logits(whole, whole.encode(captions, images)), rtol=1e-5, atol=1e-5)
    # read in window order (Qwen2-VL's mapping), or through the inverse permutation, they are other cells' maps
    place = np.argsort(order)
    for rows, columns in ((lambda c: c, lambda p: p), (lambda c: order[c], lambda p: p[:, torch.as_tensor(order)])):
        windowed.vision_query_rows = lambda c, rows=rows: Qwen2VLAdapter.vision_query_rows(windowed, rows(c))
        windowed.vision_to_grid = lambda r, columns=columns: columns(Qwen2VLAdapter.vision_to_grid(windowed, r))
        wrong = _vision_maps(windowed, windowed.encode(captions, images), chosen)
        assert np.abs(wrong - want).max() > 1e-3
    assert not np.array_equal(place, order)


def test_qwen2_5vl_vision_maps_read_the_full_attention_blocks(new_models):
    adapter = new_models["qwen2_5vl"]
    assert adapter.vision_map_layers() == [1, 3]
    from models import Qwen2_5VLAdapter

    def full_blocks(depth):  # random-7b:N keeps a full-attention block however few blocks it keeps
        return Qwen2_5VLAdapter.seven_b(depth)["vision"]["fullatt_block_indexes"]

    assert full_blocks(2) == [1] and full_blocks(16) == [7, 15] and full_blocks(0) == [7, 15, 23, 31]


def _check_sweep(out):
    for corner in ("topleft", "topright", "bottomleft", "bottomright"):
        scores = np.load(out / f"head_diff_stats_{corner}" / "scores_full_LHN.npy")
        assert scores.shape == (4, 4, 3) and np.isfinite(scores).all()  # the discovery half of 6
        assert (out / f"ablation_{corner}_unique" / "summary.json").is_file()
    assert (out / "count_shared_unique" / "summary.json").is_file()


SWEEP = {"COUNT": "6", "ABLATE": "1", "RANDOM_CONTROLS": "3", "ABLATE_HEADS": "unique", "DEVICE": "cpu"}


@pytest.mark.parametrize("family", ["qwen2_5vl", "llava_onevision"])
def test_corner_sweep_with_count_6(family, tmp_path):
    env = {**os.environ, **SWEEP, "MODEL": family, "MODEL_PATH": "tiny-random", "DATA_DIR": str(tmp_path / "data"),
           "OUT_DIR": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(REPO / "run_corner_experiments.sh")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_sweep(tmp_path / "out")


@pytest.mark.parametrize("family", ["llava_next", "internvl3", "qwen3vl"])
def test_study_at_toy_scale_with_the_corner_sweep_and_its_ablation(family, tmp_path):
    """run_study.sh for the family alone: experiments 1, 2 and 4 on 4 worlds, the corner sweep with COUNT=6 and
    ABLATE=1 (the unique head against 3 random sets), and the report. The random-weights controls are the
    paper's families' study test's (CI time); they ran for these families by hand (docs/families.md)."""
    env = {**os.environ, **SWEEP, "MODELS": family, f"MODEL_PATH_{family.upper()}": "tiny-random", "WORLDS": "4",
           "CONTROLS": "0", "DATA_DIR": str(tmp_path / "data"), "OUT_DIR": str(tmp_path / "study")}
    done = subprocess.run(["bash", str(REPO / "run_study.sh")], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    study = tmp_path / "study"
    for exp in ("exp1", "exp2", "exp4"):
        assert (study / family / exp / "summary.json").is_file(), exp
    assert 'id="experiment-4"' in (study / "report" / "index.html").read_text()
    _check_sweep(study / family / "corners")


def test_llava_next_random_7b_has_the_published_geometry():
    """random-7b of LLaVA-NeXT: Mistral-7B (32 heads of 128 over 8 KV heads, vocabulary 32064 with the image
    token) over CLIP ViT-L/14-336, as llava-hf/llava-v1.6-mistral-7b-hf's config publishes it (not checked here:
    no download)."""
    from models import LlavaNextAdapter

    with torch.device("meta"):  # shapes only
        model, _ = LlavaNextAdapter.build_random(**LlavaNextAdapter.seven_b())
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads, text.hidden_size,
            text.intermediate_size, text.vocab_size) == (32, 32, 8, 4096, 14336, 32064)
    assert model.model.language_model.layers[0].self_attn.head_dim == 128
    assert (vision.num_hidden_layers, vision.num_attention_heads, vision.hidden_size, vision.image_size,
            vision.patch_size) == (24, 16, 1024, 336, 14)
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"


def test_internvl3_pixel_shuffle_puts_each_2x2_block_of_patches_into_its_raster_token(new_models):
    """The model's own pixel_shuffle on patch features that name their (row, column): merged token r * 16 + c holds
    exactly the patches (2r + dr, 2c + dc), the rule vision_query_rows and vision_to_grid build on."""
    adapter = new_models["internvl3"]
    side, merge = adapter._patch_side, adapter.merge
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    named = torch.tensor(np.stack([rows, cols], -1), dtype=torch.float32)[None]  # [1, row, col, (row, col)]
    merged = adapter.model.model.pixel_shuffle(named, scale_factor=adapter.model.config.downsample_ratio)
    tokens = merged.reshape(-1, merge * merge, 2).numpy()  # each token's patches, (row, col)
    grid = side // merge
    for token in range(grid * grid):
        r, c = divmod(token, grid)
        want = {(merge * r + dr, merge * c + dc) for dr in range(merge) for dc in range(merge)}
        assert {tuple(p) for p in tokens[token].astype(int)} == want


def test_internvl3_vision_rows_map_to_their_cells():
    """Planted ViT attention: every patch puts half its mass on CLS and half on itself. After vision_query_rows and
    vision_to_grid each cell's row is one-hot on the cell itself (CLS dropped, rows renormalised, a cell's four
    patches pooled); a patch looking at its right neighbour's block moves the mass there."""
    from models import InternVL3Adapter

    adapter = InternVL3Adapter(*InternVL3Adapter.build_random(), "tiny-random")
    n, grid = adapter._patch_side ** 2, adapter._grid
    attention = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    attention[:, 0] = 0.5
    attention[torch.arange(1, n + 1), torch.arange(1, n + 1)] = 0.5
    cells = np.array([0, 5, grid * grid - 1])
    maps = adapter.vision_to_grid(attention[torch.as_tensor(adapter.vision_query_rows(cells))])
    torch.testing.assert_close(maps, torch.eye(grid * grid, dtype=torch.float64)[cells])
    shifted = torch.zeros_like(attention)
    shifted[torch.arange(1, n + 1), (torch.arange(n) + adapter.merge) % n + 1] = 1.0  # two patches to the right
    maps = adapter.vision_to_grid(shifted[torch.as_tensor(adapter.vision_query_rows(cells[:2]))])
    torch.testing.assert_close(maps, torch.eye(grid * grid, dtype=torch.float64)[cells[:2] + 1])


def test_internvl3_any_picture_is_one_tile_without_thumbnail(new_models):
    """A wide and a tall picture are centre-cropped to 448 px: one tile each (a second tile or a thumbnail would
    add 256 image tokens), so the grid is the whole picture's 16 x 16 and each sample's one view is its own."""
    from PIL import Image

    adapter = new_models["internvl3"]
    rng = np.random.default_rng(3)
    pictures = [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in ((300, 900), (1000, 500))]
    batch = adapter.encode(CAPTIONS[:2], pictures)
    assert tuple(batch.inputs["pixel_values"].shape) == (2, 3, 448, 448)
    assert adapter.vision_views(batch.inputs) == [0, 1]
    for layout in batch.layouts:
        assert layout.grid == (16, 16) and len(layout.image_positions) == 256
        ids = layout.input_ids
        assert adapter.tokenizer.convert_ids_to_tokens([int(ids[layout.image_positions[0] - 1]),
                                                        int(ids[layout.image_positions[-1] + 1])]) == ["<img>", "</img>"]
    square = batch.layouts[1].word_positions("square")  # the offsets line up after <img> ... </img>
    assert adapter.tokenizer.decode(batch.layouts[1].input_ids[square]).strip() == "square"


def test_internvl3_random_7b_has_the_published_geometry():
    """random-7b of InternVL3-8B: Qwen2.5-7B (28 heads of 128 over 4 KV heads) over InternViT-300M at 448 px
    (24 layers, 16 heads, width 1024), as OpenGVLab/InternVL3-8B-hf's config publishes it (not checked here)."""
    from models import InternVL3Adapter

    with torch.device("meta"):
        model, _ = InternVL3Adapter.build_random(**InternVL3Adapter.seven_b())
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads, text.hidden_size,
            text.intermediate_size, text.vocab_size) == (28, 28, 4, 3584, 18944, 151674)
    assert model.model.language_model.layers[0].self_attn.head_dim == 128
    assert (vision.num_hidden_layers, vision.num_attention_heads, vision.hidden_size) == (24, 16, 1024)
    assert model.config.downsample_ratio == 0.5


def test_qwen3vl_deepstack_feeds_the_language_model_and_the_maps_read_every_block(new_models):
    """DeepStack is live in the tiny build: zeroing its mergers' output changes the logits, so the language model
    reads the ViT at several depths; hence the vision maps average every block (README, families)."""
    adapter = new_models["qwen3vl"]
    adapter.set_feed_size(384)
    batch = adapter.encode(CAPTIONS[:1], random_images(1))
    with torch.no_grad():
        plain = adapter.model(**batch.inputs).logits
        mergers = adapter.model.model.visual.deepstack_merger_list
        handles = [m.register_forward_hook(lambda module, args, out: torch.zeros_like(out)) for m in mergers]
        try:
            without = adapter.model(**batch.inputs).logits
        finally:
            for handle in handles:
                handle.remove()
    assert len(mergers) == 2 and not torch.allclose(plain, without)
    assert adapter.vision_map_layers() == list(range(len(adapter.vision_attention_modules())))


def test_qwen3vl_random_7b_has_the_published_geometry():
    """random-7b of Qwen3-VL-8B: 36 layers of 32 heads of 128 over 8 KV heads, a 27-block ViT of width 1152 on
    16-px patches with DeepStack at blocks 8, 16 and 24, as Qwen/Qwen3-VL-8B-Instruct's config publishes it (not
    checked here); random-7b:N keeps the DeepStack blocks below its cut."""
    from models import Qwen3VLAdapter

    with torch.device("meta"):
        model, _ = Qwen3VLAdapter.build_random(**Qwen3VLAdapter.seven_b())
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads, text.hidden_size,
            text.intermediate_size, text.vocab_size, text.head_dim) == (36, 32, 8, 4096, 12288, 151936, 128)
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.patch_size) == (27, 1152, 16, 16)
    assert list(vision.deepstack_visual_indexes) == [8, 16, 24]
    assert text.rope_parameters["mrope_section"] == [24, 20, 20] and text.rope_parameters["mrope_interleaved"]
    assert Qwen3VLAdapter.seven_b(10)["vision"]["deepstack_visual_indexes"] == [8]
