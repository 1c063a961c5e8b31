"""The patient-level CT split (training/splits/ct.toml): disjoint by patient, covering every CT folder, read by
the training config and by evaluation alike."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pydicom
import pytest

from training.config import TrainingConfigError, config_from_dict, config_to_toml
from training.splits import ROLES, SplitError, load_split, uncovered_folders


def test_every_ct_folder_is_in_the_split(shared_data: Path) -> None:
    split = load_split("training/splits/ct.toml")
    assert uncovered_folders(split, shared_data, "ct") == []
    for p in split.patients:
        for folder in p.folders:
            assert (shared_data / folder).is_dir(), f"{p.id}: {folder} does not exist"


def test_no_patient_is_in_two_roles_by_the_ids_in_the_files(shared_data: Path) -> None:
    """Folder names could hide one patient under two names: compare the PatientID written in the files."""
    split = load_split("ct")
    roles_of = defaultdict(set)
    for p in split.patients:
        for folder in p.folders:
            for f in sorted((shared_data / folder).rglob("*")):
                if not f.is_file():
                    continue
                try:
                    ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["PatientID"])
                except pydicom.errors.InvalidDicomError:
                    continue
                if ds.get("PatientID"):
                    roles_of[str(ds.PatientID)].add(p.role)
    assert roles_of, "no PatientID read"
    assert {pid: r for pid, r in roles_of.items() if len(r) > 1} == {}


def test_validation_holds_out_body_and_limb_patients_and_the_pelvis_is_noise_only() -> None:
    split = load_split("ct")
    val = split.patients_with("validation")
    assert {p.id for p in val} == {"A046441", "A058062", "STS_003", "STS_007", "STS_011"}
    assert {p.body_part for p in val} >= {"chest", "abdomen", "limb"}
    assert split.role_of_folder("ct/tcia-cc-tumor-pelvis-lowdose-2.5mm") == "noise"
    assert set(split.folders("train")).isdisjoint(split.folders("validation", "noise"))
    assert {p.role for p in split.patients} == set(ROLES)


def test_a_patient_listed_twice_or_a_folder_in_two_patients_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[patients]]\nid = "a"\nrole = "train"\nfolders = ["ct/x"]\n'
                    '[[patients]]\nid = "b"\nrole = "validation"\nfolders = ["ct/x"]\n'
                    '[[patients]]\nid = "a"\nrole = "noise"\nfolders = ["ct/y"]\n'
                    '[[patients]]\nid = "c"\nrole = "test"\nfolders = ["ct/y/z"]\n')
    with pytest.raises(SplitError) as info:
        load_split(path)
    text = str(info.value)
    assert "folder ct/x is also listed for patient a" in text
    assert "patient a is listed twice" in text
    assert "role 'test'" in text
    assert "ct/y/z (c) lies inside ct/y (a)" in text


def test_config_takes_train_and_validation_from_the_split_and_writes_it_back() -> None:
    cfg = config_from_dict({"name": "x", "data": {"split": "ct"}})
    split = load_split("ct")
    assert cfg.data.train == split.folders("train")
    assert cfg.data.validation == split.folders("validation")
    assert "ct/tcia-cc-tumor-pelvis-lowdose-2.5mm" not in cfg.data.train  # a real low-dose scan: not a target
    ssl = config_from_dict({"name": "x", "mode": "self-supervised",
                            "data": {"split": "ct", "pairs": "self-supervised"}})
    assert "ct/tcia-cc-tumor-pelvis-lowdose-2.5mm" in ssl.data.train
    import tomllib

    again = config_from_dict(tomllib.loads(config_to_toml(cfg)))  # the run folder's copy reads back
    assert again.data.train == cfg.data.train
    with pytest.raises(TrainingConfigError, match="data.split gives train and validation"):
        config_from_dict({"name": "x", "data": {"split": "ct", "train": ["ct/ge-head-7mm"]}})
