"""Colour, palette, ultrasound regions and neighbouring frames in the engine and the derived objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch

from dicom_node.denoise.engine import Engine, denoise_series
from dicom_node.denoise.errors import SeriesRefused
from dicom_node.denoise.series import scan
from models.folder import load_model_folder
from tests.fixtures.images import (
    make_colour_image,
    make_multiframe,
    make_palette_image,
    make_tiny_model,
    write_series,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    colour: dict[str, Any] = dict(modalities=["US", "OT", "ES"], input_unit="modality", offset=0.0, scale=255.0,
                                  clip=None)
    return {
        "rgb-id": make_tiny_model(root, name="rgb-id", samples_per_pixel=3, **colour),
        "rgb-rand": make_tiny_model(root, name="rgb-rand", samples_per_pixel=3, identity=False, **colour),
        "grey-rand": make_tiny_model(root, name="grey-rand", identity=False, **colour),
        "grey-id": make_tiny_model(root, name="grey-id", **colour),
        "ctx-mr": make_tiny_model(root, name="ctx-mr", modalities=["MR"], input_unit="modality", offset=0.0,
                                  scale=1.0, clip=None, context=1),
    }


def _save(ds: pydicom.Dataset, folder: Path, name: str = "img.dcm") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / name, enforce_file_format=True)
    return folder / name


def _rgb(seed: int = 0, shape: tuple[int, int] = (40, 48)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)


@pytest.mark.parametrize("photometric,planar", [("RGB", 0), ("RGB", 1), ("YBR_FULL", 0)])
def test_identity_colour_model_writes_the_decoded_rgb_interleaved(tmp_path: Path, models: dict[str, Path],
                                                                   photometric: str, planar: int) -> None:
    src = _save(make_colour_image(_rgb(), photometric=photometric, planar_configuration=planar), tmp_path / "in")
    expected = pydicom.dcmread(src).pixel_array  # pydicom's RGB of the source (YBR converted)
    result = denoise_series(tmp_path / "in", load_model_folder(models["rgb-id"]), tmp_path / "out")
    ds = pydicom.dcmread(result.paths[0])
    assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration) == ("RGB", 3, 0)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (8, 8, 7, 0)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    np.testing.assert_array_equal(ds.pixel_array, expected)


def test_grey_model_on_rgb_ultrasound_changes_only_grey_pixels_inside_tissue_regions(
        tmp_path: Path, models: dict[str, Path]) -> None:
    rng = np.random.default_rng(3)
    grey = rng.integers(40, 200, size=(48, 64), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgb[10:20, 20:30] = (230, 120, 20)  # a power Doppler blob: saturated colour
    rgb[44:48, :] = 255  # a text line, grey but outside the tissue region
    ds = make_colour_image(rgb, regions=[(1, 0, 0, 63, 41)])
    _save(ds, tmp_path / "in")
    result = denoise_series(tmp_path / "in", load_model_folder(models["grey-rand"]), tmp_path / "out")
    out = pydicom.dcmread(result.paths[0]).pixel_array
    np.testing.assert_array_equal(out[10:20, 20:30], rgb[10:20, 20:30])
    np.testing.assert_array_equal(out[42:], rgb[42:])
    tissue = np.zeros((48, 64), bool)
    tissue[:42] = True
    tissue[10:20, 20:30] = False
    assert (out[tissue] != rgb[tissue]).any(axis=-1).mean() > 0.5  # the random model changes the B-mode
    assert (out[tissue][:, 0] == out[tissue][:, 1]).all() and (out[tissue][:, 1] == out[tissue][:, 2]).all()


def test_strength_zero_and_identity_leave_colour_untouched(tmp_path: Path, models: dict[str, Path]) -> None:
    rgb = _rgb(5)
    _save(make_colour_image(rgb), tmp_path / "in")
    for i, (name, strength) in enumerate((("grey-rand", 0.0), ("rgb-rand", 0.0), ("grey-id", 1.0))):
        result = denoise_series(tmp_path / "in", load_model_folder(models[name]), tmp_path / f"out{i}",
                                strength=strength)
        np.testing.assert_array_equal(pydicom.dcmread(result.paths[0]).pixel_array, rgb)


def test_strength_blends_colour_output_and_input(tmp_path: Path, models: dict[str, Path]) -> None:
    rgb = (_rgb(6) // 2 + 64).astype(np.uint8)  # 64..191: the full change is not clipped at 0 or 255
    _save(make_colour_image(rgb, modality="OT", sop_class_uid="1.2.840.10008.5.1.4.1.1.7"), tmp_path / "in")
    engine = Engine(load_model_folder(models["rgb-rand"]))
    full = pydicom.dcmread(denoise_series(tmp_path / "in", engine, tmp_path / "a").paths[0]).pixel_array
    half = pydicom.dcmread(denoise_series(tmp_path / "in", engine, tmp_path / "b", strength=0.5).paths[0]).pixel_array
    assert (full != rgb).any()
    expected = rgb.astype(float) + 0.5 * (full.astype(float) - rgb)
    assert np.abs(half - expected).max() <= 1.0  # rounding of the two


@pytest.mark.parametrize("entry_bits", [8, 16])
def test_palette_becomes_rgb_without_the_palette(tmp_path: Path, models: dict[str, Path], entry_bits: int) -> None:
    lut = np.zeros((256, 3), np.int64)
    lut[:200] = np.arange(200)[:, None]  # a grey ramp, then Doppler colours
    lut[200:] = [[255, 40 + i, 0] for i in range(56)]
    if entry_bits == 16:
        lut = lut << 8
    index = np.random.default_rng(2).integers(0, 256, size=(32, 40), dtype=np.uint8)
    ds = make_palette_image(index, lut, entry_bits=entry_bits)
    _save(ds, tmp_path / "in")
    result = denoise_series(tmp_path / "in", load_model_folder(models["grey-id"]), tmp_path / "out")
    out = pydicom.dcmread(result.paths[0])
    assert (out.PhotometricInterpretation, out.SamplesPerPixel, out.BitsAllocated) == ("RGB", 3, 8)
    assert not [e for e in out if e.keyword.endswith("PaletteColorLookupTableData")
                or e.keyword.endswith("PaletteColorLookupTableDescriptor")]
    expected = (lut >> 8 if entry_bits == 16 else lut)[index].astype(np.uint8)
    np.testing.assert_array_equal(out.pixel_array, expected)


def test_colour_model_refuses_a_grey_series(tmp_path: Path, models: dict[str, Path]) -> None:
    write_series(tmp_path / "in", np.zeros((2, 16, 16), np.uint8), modality="OT", slope=None)
    with pytest.raises(SeriesRefused, match="denoises colour"):
        denoise_series(tmp_path / "in", load_model_folder(models["rgb-id"]), tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _capture_inputs(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    seen: list[np.ndarray] = []
    real = engine.residual

    def spy(x: np.ndarray) -> np.ndarray:
        seen.extend(x.copy())
        return real(x)

    monkeypatch.setattr(engine, "residual", spy)
    return seen


def test_context_feeds_adjacent_slices_across_batches_and_repeats_the_ends(
        tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # Slice k holds the value 10 * (k + 1); files and instance numbers are shuffled, position decides the order.
    volume = np.stack([np.full((16, 16), 10 * (k + 1), np.uint16) for k in range(5)])
    write_series(tmp_path / "in", volume, modality="MR", slope=None, shuffle_instance_numbers=True, seed=4)
    engine = Engine(load_model_folder(models["ctx-mr"]), batch_size=2)  # runs of two: neighbours cross runs
    seen = _capture_inputs(engine, monkeypatch)
    result = denoise_series(tmp_path / "in", engine, tmp_path / "out")
    assert [tuple(float(c[0, 0]) for c in x) for x in seen] == [
        (10, 10, 20), (10, 20, 30), (20, 30, 40), (30, 40, 50), (40, 50, 50)]
    np.testing.assert_array_equal(sorted(pydicom.dcmread(p).pixel_array[0, 0] for p in result.paths),
                                  [10, 20, 30, 40, 50])  # identity model: exact


def test_context_in_a_multiframe_follows_positions_not_storage(
        tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    stored_order = [2, 0, 3, 1]  # frame i lies at z = stored_order[i]
    volume = np.stack([np.full((16, 16), 100 + z, np.uint16) for z in stored_order])
    ds = make_multiframe(volume)
    for item, z in zip(ds.PerFrameFunctionalGroupsSequence, stored_order):
        item.PlanePositionSequence[0].ImagePositionPatient = [0.0, 0.0, float(z)]
    _save(ds, tmp_path / "in")
    engine = Engine(load_model_folder(models["ctx-mr"]))
    seen = _capture_inputs(engine, monkeypatch)
    result = denoise_series(tmp_path / "in", engine, tmp_path / "out")
    assert [tuple(float(c[0, 0]) for c in x) for x in seen] == [
        (100, 100, 101), (100, 101, 102), (101, 102, 103), (102, 103, 103)]
    out = pydicom.dcmread(result.paths[0])
    assert out.NumberOfFrames == 4
    np.testing.assert_array_equal(out.pixel_array, volume)  # written back in stored order


def test_colour_multiframe_keeps_frames_and_scans_as_one_instance(tmp_path: Path, models: dict[str, Path]) -> None:
    frames = np.stack([_rgb(k, (24, 32)) for k in range(3)])
    ds = make_colour_image(frames, sop_class_uid="1.2.840.10008.5.1.4.1.1.3.1")
    ds.FrameTime, ds.FrameIncrementPointer = "33.3", 0x00181063
    _save(ds, tmp_path / "in")
    (series,) = scan([tmp_path / "in"]).series
    assert series.frame_count == 3
    result = denoise_series(series, load_model_folder(models["rgb-id"]), tmp_path / "out")
    out = pydicom.dcmread(result.paths[0])
    assert (out.NumberOfFrames, out.PhotometricInterpretation) == (3, "RGB")
    np.testing.assert_array_equal(out.pixel_array, frames)
