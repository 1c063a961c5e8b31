"""X-ray and ultrasound training recipes: noise statistics, readers, MONOCHROME1, datasets, a tiny run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.modalities import recipe_for, recipe_for_modality, xray
from training.modalities import ultrasound as us

# ------------------------------------------------------------------------------------------------ X-ray noise


def test_poisson_gaussian_variance_is_gain_times_signal_plus_electronic_variance():
    rng = np.random.default_rng(0)
    gain, sd = 0.01, 0.02
    for signal in (0.2, 0.8):
        clean = np.full((400, 400), signal)
        noise = xray.poisson_gaussian(clean, gain, sd, 0.0, rng) - clean
        expected = gain * signal + sd**2
        assert abs(noise.mean()) < 3 * math.sqrt(expected / noise.size) + 1e-4
        assert noise.var() == pytest.approx(expected, rel=0.03)


def test_correlated_detector_noise_keeps_its_variance_and_spreads_to_neighbours():
    rng = np.random.default_rng(1)
    clean = np.full((400, 400), 0.5)
    white = xray.poisson_gaussian(clean, 0.01, 0.02, 0.0, rng) - clean
    blurred = xray.poisson_gaussian(clean, 0.01, 0.02, 1.0, rng) - clean
    assert blurred.var() == pytest.approx(white.var(), rel=0.05)

    def neighbour_correlation(n):
        return float(np.corrcoef(n[:, :-1].ravel(), n[:, 1:].ravel())[0, 1])

    assert abs(neighbour_correlation(white)) < 0.02
    assert neighbour_correlation(blurred) > 0.6  # a 1 px Gaussian: exp(-1/4) = 0.78 for the continuous kernel


def test_xray_noisy_is_integer_and_within_the_stored_range():
    image = xray.Image2D("a.dcm", np.full((64, 64), 1000.0, np.float32), "a", (0.0, 1023.0), processed=False)
    noisy = xray.xray_noisy(image, image.pixels, (0.0, 1000.0), 0.05, 0.05, 0.5, np.random.default_rng(2))
    assert np.array_equal(noisy, np.rint(noisy))
    assert noisy.min() >= 0 and noisy.max() == 1023  # clipped at the top of the 10-bit range


# ------------------------------------------------------------------------------------------------ speckle


def test_speckle_on_the_envelope_is_additive_after_log_compression():
    """Multiplicative speckle on the envelope: the same log-domain noise at every echo level (no electronic noise,
    no clipping), and the intensity ratio is Gamma(L, 1/L): mean 1, variance 1/L."""
    looks, dr = 2, 55.0
    diffs = []
    for level in (120.0, 200.0):
        clean = np.full((256, 256), level)
        noisy = us.speckle_noisy(clean, 255.0, looks, 1.5, 2.0, -300.0, dr, np.random.default_rng(3),
                                 quantise=False)
        diffs.append(noisy - clean)
        ratio = (us.to_envelope(noisy, 255.0, dr) / us.to_envelope(clean, 255.0, dr)) ** 2
        assert ratio.mean() == pytest.approx(1.0, abs=0.05)
        assert ratio.var() == pytest.approx(1.0 / looks, rel=0.15)
    # Same seed: the identical speckle field, so the log-domain difference does not depend on the level at all.
    np.testing.assert_allclose(diffs[0], diffs[1], atol=1e-6)


def test_speckle_log_domain_sd_matches_gamma_theory():
    from scipy.special import polygamma

    looks, dr = 4, 50.0
    clean = np.full((512, 512), 150.0)
    noisy = us.speckle_noisy(clean, 255.0, looks, 1.0, 1.0, -300.0, dr, np.random.default_rng(4), quantise=False)
    # log10 of a Gamma(L, 1/L) intensity: SD = sqrt(psi_1(L)) / ln 10; the display has 255 / DR levels per dB.
    expected = 10.0 * math.sqrt(float(polygamma(1, looks))) / math.log(10) * 255.0 / dr
    assert float(np.std(noisy - clean)) == pytest.approx(expected, rel=0.08)


def test_electronic_noise_fills_dark_regions_but_barely_touches_bright_ones():
    rng = np.random.default_rng(5)
    dark, bright = np.full((128, 128), 10.0), np.full((128, 128), 230.0)
    kw = dict(top=255.0, looks=16, sigma_axial=1.0, lateral_ratio=1.0, dynamic_range_db=55.0, quantise=False)
    lift_dark = (us.speckle_noisy(dark, electronic_db=10.0, rng=rng, **kw) - dark).mean()
    lift_bright = (us.speckle_noisy(bright, electronic_db=10.0, rng=rng, **kw) - bright).mean()
    assert lift_dark > 20 and abs(lift_bright) < 2


def test_envelope_round_trip():
    image = np.linspace(0, 255, 256)
    np.testing.assert_allclose(us.to_log(us.to_envelope(image, 255.0, 55.0), 255.0, 55.0), image, atol=1e-9)


# ------------------------------------------------------------------------------------------------ readers


def _write_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def test_png_reader_grey_16_bit_and_colour(tmp_path):
    grey = (np.arange(64 * 64) % 256).astype(np.uint8).reshape(64, 64)
    assert np.array_equal(xray.read_png_grey(_write_png(tmp_path / "g.png", grey)), grey.astype(np.float32))
    deep = (np.arange(64 * 64) * 13).astype(np.uint16).reshape(64, 64)
    assert np.array_equal(xray.read_png_grey(_write_png(tmp_path / "d.png", deep)), deep.astype(np.float32))
    rgb = np.stack([grey] * 3, axis=-1)
    assert np.array_equal(xray.read_png_grey(_write_png(tmp_path / "c.png", rgb)), grey.astype(np.float32))
    images = xray.read_xray_images([tmp_path])
    assert {im.name for im in images} == {"g.png", "d.png", "c.png"}
    assert all(im.processed for im in images)
    assert {im.name: im.value_range[1] for im in images}["d.png"] == 65535.0


def _dicom(path: Path, stored: np.ndarray, photometric: str, bits: int = 10) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1")
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CR", "P1"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_monochrome1_is_inverted_over_the_stored_range_as_the_node_does(tmp_path):
    from dicom_node.denoise.pixels import PixelFormat, scaling_for
    from models.folder import Normalization

    rng = np.random.default_rng(6)
    stored = rng.integers(0, 1024, (48, 40)).astype(np.uint16)
    image = xray.read_dicom_grey(_dicom(tmp_path / "m1.dcm", stored, "MONOCHROME1"))
    assert image.inverted and image.value_range == (0.0, 1023.0)
    np.testing.assert_array_equal(image.pixels, 1023.0 - stored)  # exact: 10-bit values kept
    # What the network sees in training equals what the node feeds it for the same MONOCHROME1 stored values.
    offset, scale = image.params()
    trained = (image.pixels - offset) / scale
    fmt = PixelFormat(16, 10, 0, "MONOCHROME1")
    norm = Normalization(input_unit="modality", mode="per-image", percentiles=[0.5, 99.5], invert_monochrome1=True)
    node = scaling_for(stored.astype(np.float64), fmt, norm).to_network(stored.astype(np.float64))
    np.testing.assert_allclose(trained, node, atol=1e-5)

    plain = xray.read_dicom_grey(_dicom(tmp_path / "m2.dcm", stored, "MONOCHROME2"))
    assert not plain.inverted
    np.testing.assert_array_equal(plain.pixels, stored)


def test_real_xray_and_ultrasound_files(shared_data):
    tibia = xray.read_dicom_grey(shared_data / "xr/wg04-cr-tibia-RG3-jpegls.dcm")
    assert tibia.inverted and tibia.pixels.shape == (1760, 1760) and tibia.value_range == (0.0, 1023.0)
    assert np.array_equal(tibia.pixels, np.rint(tibia.pixels))
    obx = us.dicom_grey_bmode(shared_data / "us/dicom/OBXXXX1A.dcm")  # palette colour
    assert obx.pixels.shape == (600, 800) and 0.3 < obx.mask.mean() < 0.95
    assert not obx.mask[:60].any()  # above the B-mode region of its Sequence of Ultrasound Regions
    doppler = us.dicom_grey_bmode(shared_data / "us/dicom/US1_UNC.dcm")  # RGB with a power-Doppler overlay
    assert 0.5 < doppler.mask.mean() < 1.0 and doppler.pixels.max() <= 255
    assert us.us_subject("033_2HC.png") == us.us_subject("033_HC.png") == "033"


# ------------------------------------------------------------------------------------------------ split, datasets


def test_split_keeps_subjects_together_and_honours_named_files():
    images = [xray.Image2D(f"{s:03d}_{k}HC.png", np.zeros((4, 4), np.float32), f"{s:03d}", (0, 255), True)
              for s in range(60) for k in ("", "2")]
    images.append(xray.Image2D("x.dcm", np.zeros((4, 4), np.float32), "x", (0, 255), False))
    recipe = {"validation_fraction": 0.1, "test_fraction": 0.2, "train": [], "test": ["x.dcm"]}
    parts = xray.split_images(images, recipe)
    where = {im.subject: part for part, ims in parts.items() for im in ims}
    assert all(where[im.subject] == part for part, ims in parts.items() for im in ims)
    assert where["x"] == "test" and parts["test"] and parts["validation"] and parts["train"]
    assert parts == xray.split_images(images, recipe)  # stable


@pytest.mark.parametrize("kind", ["xray", "ultrasound"])
def test_dataset_items_are_normalised_patch_pairs(kind):
    rng = np.random.default_rng(7)
    pixels = (rng.random((120, 150)) * 200 + 20).astype(np.float32)
    image = xray.Image2D("a.png", pixels, "a", (0.0, 255.0), True)
    if kind == "xray":
        def noise(im, clean, params, r):
            return xray.xray_noisy(im, clean, params, 2e-3, 0.01, 0.5, r)
    else:
        def noise(im, clean, params, r):
            return us.speckle_noisy(clean, 255.0, 2, 1.5, 2.0, 0.0, 55.0, r)
    data = xray.PatchPairs([image], noise, 32, 10, seed=3, margin=xray.MARGIN if kind == "xray" else 0)
    a, b = data[4]
    assert a.shape == b.shape == (1, 32, 32) and a.dtype == b.dtype == torch.float32
    assert -0.05 <= float(b.min()) and float(b.max()) <= 1.05  # percentile-normalised clean patch
    assert float((a - b).abs().mean()) > 0.005
    a2, b2 = data[4]
    assert torch.equal(a, a2) and torch.equal(b, b2)  # a function of (seed, index)


def _speckle(im, clean, params, r):
    return us.speckle_noisy(clean, 255.0, 2, 1.5, 2.0, 3.0, 55.0, r)  # strong: dark pixels get noise too


def test_overlays_are_text_graphics_and_black_with_their_grey_levels():
    rng = np.random.default_rng(5)
    seen_black = seen_bright = 0
    for _ in range(30):
        values, mask = us.us_overlay((64, 64), rng)
        assert values.shape == mask.shape == (64, 64) and mask.dtype == bool and mask.any()
        v = values[mask]
        assert np.all((v == 0) | ((v >= 150) & (v <= 255)))
        assert not values[~mask].any()
        seen_black += int((v == 0).any())
        seen_bright += int((v >= 150).any())
    assert seen_black >= 5 and seen_bright >= 5


def test_overlay_pixels_are_identical_in_input_and_target_and_noise_falls_only_elsewhere():
    rng = np.random.default_rng(9)
    pixels = (rng.random((120, 150)) * 200 + 20).astype(np.float32)
    image = xray.Image2D("a.png", pixels, "a", (0.0, 255.0), True)
    data = us.OverlayPatchPairs([image], _speckle, 48, 20, seed=3, margin=0, overlay_probability=1.0)
    for i in range(len(data)):
        noisy, clean, overlay, k, _ = data.pair(i)
        assert overlay is not None and overlay.any() and k == 0
        assert np.array_equal(noisy[overlay], clean[overlay])  # text, lines, black: no noise, same in both
        assert clean[overlay].min() >= 0 and np.all((clean[overlay] == 0) | (clean[overlay] >= 150))
        if (~overlay).sum() > 100:
            assert np.abs(noisy[~overlay] - clean[~overlay]).mean() > 1.0  # speckle on the B-mode pixels
        a, b = data[i]  # normalised and augmented alike: still equal where the overlay is
        assert int((a == b).sum()) >= int(overlay.sum())
    off = us.OverlayPatchPairs([image], _speckle, 48, 5, seed=3, margin=0, overlay_probability=0.0)
    plain = xray.PatchPairs([image], _speckle, 48, 5, seed=3, margin=0)
    for i in range(len(off)):
        assert off.pair(i)[2] is None
        a, b = off[i]
        a0, b0 = plain[i]
        assert torch.equal(a, a0) and torch.equal(b, b0)  # probability 0: the recipe as before


@pytest.mark.parametrize("bad", [-0.1, 1.5, "often", True, [0.5]])
def test_overlay_probability_is_validated(bad):
    from training.config import TrainingConfigError, config_from_dict

    cfg = config_from_dict({"name": "x", "modality": "US", "model": {"architecture": "unet-res-small"},
                            "noise": {"kind": "ultrasound"}, "recipe": {"overlay_probability": bad}})
    with pytest.raises(TrainingConfigError, match="overlay_probability"):
        us.card_modalities(cfg)


def test_us_cnn_config_trains_with_overlays():
    from training.config import load_config

    cfg = load_config(Path(__file__).parents[2] / "training/configs/us-cnn.toml")
    assert 0.0 < float(cfg.recipe["overlay_probability"]) <= 1.0
    assert us.RECIPE_DEFAULTS["overlay_probability"] == 0.0  # other ultrasound configs: unchanged


def test_recipes_are_found_by_kind_and_modality():
    assert recipe_for("xray") is xray and recipe_for("ultrasound") is us
    assert recipe_for_modality("XA") is xray and recipe_for_modality("CR") is xray
    assert recipe_for_modality("US") is us


# ------------------------------------------------------------------------------------------------ a tiny run


@pytest.mark.parametrize("kind", ["xray", "ultrasound"])
def test_tiny_training_run_exports_a_card_and_evaluates_through_the_cli(tmp_path, kind, capsys):
    from models.folder import load_model_folder
    from training.cli import main
    from training.config import config_from_dict
    from training.loops import train

    rng = np.random.default_rng(8)
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(4):  # smooth images with some structure
        y, x = np.mgrid[0:96, 0:96]
        img = 100 + 80 * np.sin(x / (7 + k)) * np.cos(y / 11) + rng.normal(0, 2, (96, 96))
        _write_png(folder / f"{k:03d}_HC.png", np.clip(img, 0, 255).astype(np.uint8))
    recipe = {"data": [str(folder)], "train": ["000_HC.png", "001_HC.png"], "test": ["002_HC.png", "003_HC.png"],
              "validation_fraction": 0.0, "test_fraction": 0.0}
    cfg = config_from_dict({
        "name": f"tiny-{kind}", "modality": "XR" if kind == "xray" else "US",
        "model": {"architecture": "unet-res-small"},
        "data": {"patch": 32, "batch": 2, "validation_patches": 2},
        "noise": {"kind": kind}, "recipe": recipe,
        "train": {"steps": 2, "warmup": 1, "threads": 1, "validate_every": 0, "checkpoint_every": 0},
    })
    result = train(cfg, tmp_path / "run", progress=False)
    model = load_model_folder(result.model_dir, "cpu")
    card = model.card
    assert card.samples_per_pixel == 1 and card.context == 0
    assert card.training["test_images"] == ["002_HC.png", "003_HC.png"]
    if kind == "xray":
        assert card.modalities == ["CR", "DX", "XA"] and card.normalization.invert_monochrome1
    else:
        assert card.modalities == ["US"] and card.strength_range == [0.0, 1.0]
    out = tmp_path / "eval"
    assert main(["evaluate", str(result.model_dir), str(folder), "--out", str(out), "--slices", "1"]) == 0
    table = (out / "table.md").read_text()
    assert "002_HC.png" in table and "000_HC.png" not in table  # only held-out images are scored
    assert "bm3d" in table and "nlm" in table
    assert (out / "metrics.json").is_file() and list(out.glob("*-strong.png"))


def test_clipped_region_sets_one_side_to_the_value_and_leaves_the_rest() -> None:
    from training.modalities.xray import clipped_region

    rng = np.random.default_rng(3)
    clean = np.arange(72 * 72, dtype=np.float32).reshape(72, 72) + 10.0
    for _ in range(20):
        out = clipped_region(clean, 0.0, rng)
        clipped = out == 0.0
        assert 0.1 < clipped.mean() < 0.75
        assert np.array_equal(out[~clipped], clean[~clipped])
