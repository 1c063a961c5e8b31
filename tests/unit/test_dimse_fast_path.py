"""The hand-encoded C-STORE response is byte for byte what pynetdicom would send."""

from __future__ import annotations

from typing import Any

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from dicom_node.dimse.reactor import command_p_data_tf, encode_c_store_rsp, encode_p_data, error_comment


def _response(status: int, comment: str | None, sop_instance_uid: str) -> C_STORE:
    primitive: Any = C_STORE()  # (pynetdicom types some of its setters as taking None)
    primitive.MessageIDBeingRespondedTo = 7
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    primitive.AffectedSOPInstanceUID = sop_instance_uid
    primitive.Status = status
    if comment is not None:
        primitive.ErrorComment = comment
    return primitive


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xA700, 0xC210])
@pytest.mark.parametrize("comment", [None, "odd length", "even length!", "x" * 64])
@pytest.mark.parametrize("sop_instance_uid", ["1.2.3.4.55", "1.2.3.4.5"])
def test_c_store_response_matches_pynetdicom(status: int, comment: str | None, sop_instance_uid: str) -> None:
    primitive = _response(status, comment, sop_instance_uid)
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    expected = b"".join(encode_p_data(p) for p in message.encode_msg(3, 16384))
    command = encode_c_store_rsp(primitive)
    assert command is not None
    assert command_p_data_tf(3, command) == expected


def test_responses_it_does_not_handle_fall_back() -> None:
    primitive: Any = _response(0xC210, None, "1.2.3")
    primitive.OffendingElement = [0x00100010]
    assert encode_c_store_rsp(primitive) is None
    request = C_STORE()  # a request, not a response
    assert encode_c_store_rsp(request) is None


def _stored_request(tmp_path, sop_instance_uid: str, priority: int, message_id: int, data_bytes: int):
    """A C-STORE request for a file sent as stored, as ``send_c_store(path)`` makes it."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian
    from pynetdicom.dsutils import split_dataset

    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = sop_instance_uid
    ds.PatientName = "Fast^Path"
    ds.add_new(0x00091010, "OB", bytes(range(256)) * (data_bytes // 256))  # bulk, so the data set fragments
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / f"{sop_instance_uid}-{data_bytes}.dcm"
    ds.save_as(path, enforce_file_format=True)
    request = C_STORE()
    request.MessageID = message_id
    request.Priority = priority
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = sop_instance_uid
    request._dataset_path = (path, split_dataset(path)[1])
    return request


@pytest.mark.parametrize("maximum_pdu", [0, 16384, 4096, 1000])
@pytest.mark.parametrize("sop_instance_uid", ["1.2.3.4.55", "1.2.3.4.5"])
@pytest.mark.parametrize("priority,message_id", [(2, 1), (0, 65535), (1, 300)])
@pytest.mark.parametrize("data_bytes", [0, 40960])
def test_c_store_request_of_a_stored_file_matches_pynetdicom(tmp_path, maximum_pdu: int, sop_instance_uid: str,
                                                             priority: int, message_id: int,
                                                             data_bytes: int) -> None:
    from pynetdicom.dimse_messages import C_STORE_RQ

    from dicom_node.dimse.reactor import encode_c_store_rq, file_data_set_p_data_tfs

    request = _stored_request(tmp_path, sop_instance_uid, priority, message_id, data_bytes)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    expected = [encode_p_data(p) for p in message.encode_msg(5, maximum_pdu)]
    command = encode_c_store_rq(request)
    assert command is not None
    path, offset = request._dataset_path
    ours = [command_p_data_tf(5, command), *file_data_set_p_data_tfs(5, path, offset, maximum_pdu)]
    assert ours == expected


def test_requests_it_does_not_handle_fall_back(tmp_path) -> None:
    from dicom_node.dimse.reactor import encode_c_store_rq

    request = _stored_request(tmp_path, "1.2.3", 2, 1, 0)
    request.MoveOriginatorApplicationEntityTitle = "MOVER"
    request.MoveOriginatorMessageID = 3
    assert encode_c_store_rq(request) is None
    assert encode_c_store_rq(_response(0, None, "1.2.3")) is None  # a response, not a request


def test_pdus_are_joined_into_blocks_in_order() -> None:
    from dicom_node.dimse.reactor import joined

    pdus = [bytes([i]) * 10 for i in range(7)]
    blocks = list(joined(pdus, 25))
    assert b"".join(blocks) == b"".join(pdus)  # the same bytes in the same order
    assert [len(b) for b in blocks] == [30, 30, 10]  # each block reaches the limit, the last takes the rest
    assert list(joined([], 25)) == []


@pytest.mark.parametrize("reason, expected", [
    ("element (0028,0010) at byte 788 has unknown VR b'\\x01\\x02'",
     "element (0028,0010) at byte 788 has unknown VR b'/x01/x02'"),
    ("tab\tnew\nline  and  spaces", "tab new line and spaces"),
    ("Ünïcode \x00 nul", "?n?code ? nul"),
    ("x" * 100, "x" * 64),
])
def test_error_comment_is_one_printable_value_of_at_most_64_characters(reason: str, expected: str) -> None:
    assert error_comment(reason) == expected


def test_error_comment_of_several_values_is_joined() -> None:
    from pydicom.multival import MultiValue

    assert error_comment(MultiValue(str, ["a", "b", "c"])) == "a/b/c"


def test_fast_path_sends_a_sanitised_error_comment() -> None:
    """Whatever the handler put in the primitive, the encoded comment is one value (no backslash)."""
    primitive = _response(0xC210, "unknown VR b'\\x01\\x02'", "1.2.3.4")
    command = encode_c_store_rsp(primitive)
    assert command is not None
    at = command.index(b"\x00\x00\x02\x09")
    length = int.from_bytes(command[at + 4:at + 8], "little")
    assert command[at + 8:at + 8 + length].rstrip(b" ") == b"unknown VR b'/x01/x02'"
