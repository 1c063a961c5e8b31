"""The endoscopy recipe: low-light colour noise in linear RGB, JPEG, datasets, a 3-channel training step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from training.modalities import endoscopy as endo


def _colour_scene(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """A smooth reddish 'mucosa' with some structure, display values in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([0.65 + 0.2 * np.sin(6 * xx), 0.35 + 0.1 * np.cos(5 * yy), 0.28 + 0.05 * xx], axis=-1)
    return np.clip(base + 0.02 * rng.standard_normal((h, w, 3)), 0, 1).astype(np.float32)


@pytest.mark.parametrize("gamma", ["srgb", 2.2])
def test_gamma_round_trip(gamma) -> None:
    x = np.linspace(0, 1, 1001, dtype=np.float32)
    lin = endo.to_linear(x, gamma)
    assert lin[500] < 0.5 * x[500]  # really linearised: mid-grey display is about 0.2 in linear light
    np.testing.assert_allclose(endo.from_linear(lin, gamma), x, atol=1e-5)


def test_sensor_noise_is_poisson_gaussian_in_linear_light() -> None:
    rng = np.random.default_rng(1)
    light, read = 80.0, 3.0
    levels = [0.02, 0.1, 0.3, 0.7]
    measured = []
    for v in levels:
        flat = np.full((256, 256, 3), v, dtype=np.float32)
        noise = endo.sensor_noise(flat, light, read, rng)
        assert abs(float(noise.mean())) < 0.01 * v + 1e-3  # zero mean
        measured.append(float(noise.var()))
    expected = [v / light + (read / light) ** 2 for v in levels]
    np.testing.assert_allclose(measured, expected, rtol=0.05)
    slope = np.polyfit(levels, measured, 1)[0]  # variance grows linearly with the signal, slope 1 / light
    assert slope == pytest.approx(1 / light, rel=0.05)


def test_bayer_noise_is_spatially_correlated_and_still_unbiased() -> None:
    rng = np.random.default_rng(2)
    flat = np.full((128, 128, 3), 0.3, dtype=np.float32)
    white = endo.sensor_noise(flat, 50.0, 1.0, rng)
    bayer = endo.sensor_noise(flat, 50.0, 1.0, rng, bayer=True)

    def lag1(n):
        a = n[:, :-1, 0].ravel()
        b = n[:, 1:, 0].ravel()
        return float(np.corrcoef(a, b)[0, 1])

    assert abs(lag1(white)) < 0.05
    assert lag1(bayer) > 0.3
    assert abs(float(bayer.mean())) < 2e-3


def test_no_mean_colour_shift_in_linear_light() -> None:
    clean = _colour_scene(192, 192)
    lin = endo.to_linear(clean)
    rng = np.random.default_rng(3)
    for light in (20.0, 100.0, 500.0):
        shifts = np.mean([endo.sensor_noise(lin, light, 2.0, rng).mean(axis=(0, 1)) for _ in range(8)], axis=0)
        assert np.abs(shifts).max() < 0.002, (light, shifts)  # under 0.2 % of the range in every channel


def test_jpeg_step_is_applied() -> None:
    clean = _colour_scene()
    plain = endo.simulate_low_light(clean, 100.0, 2.0, np.random.default_rng(4))
    jpeg = endo.simulate_low_light(clean, 100.0, 2.0, np.random.default_rng(4), jpeg_quality=75)
    assert np.allclose(plain * 255, np.rint(plain * 255))  # 8-bit output
    assert np.abs(jpeg - plain).mean() > 1 / 255  # JPEG changed it
    np.testing.assert_array_equal(jpeg, endo.jpeg_roundtrip(plain, 75))  # and JPEG is the last step
    # JPEG drops fine noise: less high-frequency energy than the uncompressed noisy image
    assert np.abs(np.diff(jpeg, axis=1)).mean() < np.abs(np.diff(plain, axis=1)).mean()


def test_jpeg_quality_estimate_from_quantisation_tables(tmp_path) -> None:
    for quality in (60, 75, 90):
        path = tmp_path / f"q{quality}.jpg"
        Image.fromarray(endo.quantise8(_colour_scene())).save(path, quality=quality)
        with Image.open(path) as im:
            estimate = endo.estimate_jpeg_quality(im)
        assert estimate is not None and abs(estimate - quality) <= 2


def test_dataset_items_are_colour_pairs() -> None:
    images = [endo.ColourImage("a", _colour_scene(96, 128, 0), lossy=True, jpeg_quality=80),
              endo.ColourImage("b", _colour_scene(80, 80, 1), lossy=False)]
    ds = endo.EndoscopyPairs(images, 32, 10, endo.EndoscopySettings(), seed=0)
    noisy, clean = ds[3]
    assert noisy.shape == clean.shape == (3, 32, 32)
    assert noisy.dtype == clean.dtype == torch.float32
    assert 0 <= float(noisy.min()) and float(noisy.max()) <= 1
    assert float((noisy - clean).std()) > 0.005
    again = ds[3]
    assert torch.equal(again[0], noisy) and torch.equal(again[1], clean)  # a pure function of (seed, index)


def test_real_endoscopy_images_are_read_as_rgb(shared_data) -> None:
    vl = endo.read_colour_images(shared_data / "endoscopy/wg04-vl/VL1_UNC.dcm")
    assert len(vl) == 1 and vl[0].rgb.shape == (486, 756, 3) and not vl[0].lossy
    means = vl[0].rgb.mean(axis=(0, 1))
    assert means[0] > means[1] > means[2]  # mucosa is red: RGB order kept
    kvasir = endo.read_colour_images(shared_data / "endoscopy/kvasir-seg-jpeg")
    assert len(kvasir) == 4 and all(im.lossy and im.jpeg_quality for im in kvasir)


def test_colour_mean_loss_penalises_a_colour_cast() -> None:
    from training.loops import pixel_loss

    target = torch.rand(2, 3, 16, 16)
    cast = target + torch.tensor([0.02, 0.0, -0.02]).view(1, 3, 1, 1)
    assert pixel_loss("l1-colour-mean", cast, target) > pixel_loss("l1", cast, target)
    assert float(pixel_loss("l1-colour-mean", target, target)) == 0.0


def test_tiny_colour_training_exports_a_colour_card_and_evaluates(tmp_path) -> None:
    from models.folder import load_model_folder
    from training.config import config_from_dict
    from training.loops import train

    for i in range(2):
        Image.fromarray(endo.quantise8(_colour_scene(72, 72, i))).save(tmp_path / f"train{i}.jpg", quality=85)
    Image.fromarray(endo.quantise8(_colour_scene(72, 72, 5))).save(tmp_path / "held.png")
    cfg = config_from_dict({
        "name": "endo-tiny", "modality": "ES", "seed": 0,
        "model": {"architecture": "unet-res-small",
                  "arguments": {"channels": [8, 16], "in_channels": 3, "out_channels": 3}},
        "data": {"root": str(tmp_path), "train": ["train0.jpg", "train1.jpg"], "validation": ["held.png"],
                 "patch": 32, "batch": 2, "validation_patches": 2},
        "noise": {"kind": "endoscopy"},
        "recipe": {"evaluate_light_levels": [50.0], "evaluate_crop": 64},
        "train": {"steps": 2, "warmup": 1, "threads": 1, "loss": "l1-colour-mean", "validate_every": 2,
                  "checkpoint_every": 0, "log_every": 1},
    })
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.steps == 2 and np.isfinite(result.final_loss)
    assert result.model_dir is not None  # the run finished, so it exported a model
    loaded = load_model_folder(result.model_dir, "cpu")
    card = loaded.card
    assert (card.samples_per_pixel, card.context) == (3, 0)
    assert card.modalities == ["ES", "XC", "OT"]
    assert (card.normalization.mode, card.normalization.scale) == ("fixed", 255.0)
    out = loaded.network(torch.rand(1, 3, 40, 48))
    assert out.shape == (1, 3, 40, 48)

    metrics = endo.evaluate(result.model_dir, [str(tmp_path / "held.png")], tmp_path / "eval", seed=1,
                            baselines=("nlm",), write_card=True)
    assert set(metrics["by_light"]["50"]) >= {"input", "model", "nlm", "model_minus_nlm_db"}
    assert (tmp_path / "eval" / "table.md").is_file() and (tmp_path / "eval" / "figure-held.png").is_file()
    assert "light_50" in load_model_folder(result.model_dir, "cpu").card.metrics
