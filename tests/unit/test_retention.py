"""Retention removes the files of finished or unrouted series, never those with undelivered work."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select, update

from dicom_node.assemble.assembler import assemble_once
from dicom_node.config import config_from_mapping
from dicom_node.receive.receiver import Receiver, store_instance
from dicom_node.store.database import make_engine, migrate, utcnow
from dicom_node.store.queue import (
    claim_export,
    claim_job,
    enqueue_export,
    finish_export,
    finish_job,
    pending_export_instances,
    record_instance_status,
)
from dicom_node.store.retention import purge_once
from dicom_node.store.schema import Export, Instance, Series, SeriesState
from dicom_node.store.spool import Spool
from tests import malformed
from tests.fixtures.synthetic import make_ct_series


@pytest.fixture()
def setup(tmp_path: Path):
    cfg = config_from_mapping({
        "node": {"data_dir": str(tmp_path), "quiet_seconds": 1.0},
        "retention": {"unrouted_days": 2.0, "processed_days": 5.0},
        "rules": [{"name": "ct", "match": {"Modality": "CT"}, "model": "m"}],
    }, environ={})
    engine = make_engine(cfg.database_url)
    migrate(engine)
    return cfg, engine, Receiver(Spool(cfg.spool_path), engine, 0)


def receive_series(receiver: Receiver, folder: Path, modality: str = "CT") -> str:
    files = make_ct_series(folder, n_slices=2, rows=32, cols=32, modality=modality)
    for path in files:
        ds = dcmread(path)
        store_instance(receiver, io.BytesIO(malformed.encode_dataset(ds)), "1.2.840.10008.1.2.1", ds.SOPClassUID,
                       ds.SOPInstanceUID, "SCANNER", "DENOISE")
    return str(dcmread(files[0]).SeriesInstanceUID)


def spool_count(cfg) -> int:
    return len(list(cfg.spool_path.rglob("*.dcm")))


def test_unrouted_and_delivered_series_are_purged_but_undelivered_ones_kept(setup, tmp_path: Path) -> None:
    cfg, engine, receiver = setup
    mr_uid = receive_series(receiver, tmp_path / "mr", "MR")  # matches no rule
    ct_uid = receive_series(receiver, tmp_path / "ct")
    kept_uid = receive_series(receiver, tmp_path / "ct2")
    later = utcnow() + dt.timedelta(seconds=5)
    assert len(assemble_once(engine, cfg, later)) == 3
    with engine.begin() as conn:
        for uid in (ct_uid, kept_uid):
            job = claim_job(conn, "w", later)
            out = cfg.outbox_path / f"job-{job.id}"
            out.mkdir(parents=True)
            (out / "x.dcm").write_bytes(b"derived")
            finish_job(conn, job.id, "w", f"{uid}.9", later)
            enqueue_export(conn, f"{uid}.9", "pacs", [("1.9", f"outbox/job-{job.id}/x.dcm")], later,
                           job_pk=job.id)
        # the first series' export is delivered, the second one's failed for good
        for delivered in (True, False):
            claimed = claim_export(conn, "pacs", "e", later)
            (item,) = pending_export_instances(conn, claimed.id)
            record_instance_status(conn, item[0], 0 if delivered else 0xA700, "", later)
            finish_export(conn, claimed.id, later, "", None, True)
    assert spool_count(cfg) == 6
    assert purge_once(engine, cfg, later + dt.timedelta(days=1)) == []  # nothing is old enough
    assert purge_once(engine, cfg, later + dt.timedelta(days=3)) == [mr_uid]
    assert purge_once(engine, cfg, later + dt.timedelta(days=6)) == [ct_uid]
    assert spool_count(cfg) == 2 and not (cfg.outbox_path / "job-1").exists() and (cfg.outbox_path / "job-2").exists()
    with engine.connect() as conn:
        states = dict(conn.execute(select(Series.series_uid, Series.state)).all())
        assert states == {mr_uid: SeriesState.purged, ct_uid: SeriesState.purged, kept_uid: SeriesState.complete}
        assert conn.execute(select(Instance.id)).all().__len__() == 2
    # Retrying the failed export and delivering it makes the series purgeable too.
    with engine.begin() as conn:
        conn.execute(update(Export).where(Export.job_pk == 2).values(state="succeeded"))
    assert purge_once(engine, cfg, later + dt.timedelta(days=6)) == [kept_uid]
    assert spool_count(cfg) == 0


def test_zero_days_keeps_forever(setup, tmp_path: Path) -> None:
    cfg, engine, receiver = setup
    cfg.retention.unrouted_days = 0
    receive_series(receiver, tmp_path / "mr", "MR")
    later = utcnow() + dt.timedelta(seconds=5)
    assemble_once(engine, cfg, later)
    assert purge_once(engine, cfg, later + dt.timedelta(days=1000)) == []
    assert spool_count(cfg) == 2


def test_late_instance_revives_a_purged_series(setup, tmp_path: Path) -> None:
    cfg, engine, receiver = setup
    uid = receive_series(receiver, tmp_path / "mr", "MR")
    later = utcnow() + dt.timedelta(seconds=5)
    assemble_once(engine, cfg, later)
    assert purge_once(engine, cfg, later + dt.timedelta(days=3)) == [uid]
    path = sorted((tmp_path / "mr").glob("*.dcm"))[0]
    ds = dcmread(path)
    store_instance(receiver, io.BytesIO(malformed.encode_dataset(ds)), "1.2.840.10008.1.2.1", ds.SOPClassUID,
                   ds.SOPInstanceUID, "SCANNER", "DENOISE")
    with engine.connect() as conn:
        assert conn.execute(select(Series.state)).scalar_one() == SeriesState.receiving
