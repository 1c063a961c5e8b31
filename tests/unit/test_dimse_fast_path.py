"""The hand-encoded C-STORE response is byte for byte what pynetdicom would send."""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from dicom_node.scp_reactor import command_p_data_tf, encode_c_store_rsp, encode_p_data


def _response(status: int, comment: str | None, sop_instance_uid: str) -> C_STORE:
    primitive = C_STORE()
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
    primitive = _response(0xC210, None, "1.2.3")
    primitive.OffendingElement = [0x00100010]
    assert encode_c_store_rsp(primitive) is None
    request = C_STORE()  # a request, not a response
    assert encode_c_store_rsp(request) is None
