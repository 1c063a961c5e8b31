"""DICOMweb pieces without a server: multipart splitting, status mapping, responses, credentials, configuration."""

from __future__ import annotations

import base64
from io import BytesIO
from pathlib import Path

import pytest

from dicom_node.config import ConfigError, config_from_mapping
from dicom_node.dicomweb import status as st
from dicom_node.dicomweb.multipart import MalformedMultipart, parse_media_type, read_multipart
from dicom_node.dicomweb.stow_receive import authenticate, is_stow_path
from dicom_node.dicomweb.stow_send import MultipartStream, auth_headers
from dicom_node.receive import receiver
from dicom_node.web.auth import hash_password, token_digest


class TrickleStream:
    """A request body that hands out at most ``step`` bytes per read, as a slow network does."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step, self.at = data, step, 0

    def read(self, size: int) -> bytes:
        chunk = self.data[self.at:self.at + min(size, self.step)]
        self.at += len(chunk)
        return chunk


def body(parts: list[tuple[str, bytes]], boundary: str = "b0und", preamble: bytes = b"",
         epilogue: bytes = b"") -> bytes:
    out = preamble
    for ctype, data in parts:
        out += f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode() + epilogue


@pytest.mark.parametrize("step", [1, 7, 4096])
def test_multipart_parts_are_split_whatever_the_read_sizes(tmp_path: Path, step: int) -> None:
    # Part data that looks like a boundary without being one, CRLFs inside, a preamble and an epilogue.
    first = b"\r\n--b0un\r\n--b0unX" + bytes(range(256)) * 3
    data = body([("application/dicom", first), ("application/dicom; transfer-syntax=1.2.840.10008.1.2.1", b"")],
                preamble=b"This is the preamble.\r\n", epilogue=b"trailing epilogue")
    result = read_multipart(TrickleStream(data, step), len(data), "b0und", tmp_path)
    assert result.complete and result.problem == "" and result.received == len(data)
    assert [p.path.read_bytes() for p in result.parts] == [first, b""]
    assert [p.media_type for p in result.parts] == ["application/dicom", "application/dicom"]
    assert all(p.complete for p in result.parts)
    result.remove_files()
    assert list(tmp_path.iterdir()) == []


def test_multipart_truncated_bodies_are_incomplete(tmp_path: Path) -> None:
    data = body([("application/dicom", b"A" * 100), ("application/dicom", b"B" * 100)])
    cut = data.index(b"B" * 100) + 50
    # The announced length arrives, but it ends inside the second part.
    inside = read_multipart(BytesIO(data[:cut]), cut, "b0und", tmp_path)
    assert not inside.complete and "closing boundary" in inside.problem
    assert [p.complete for p in inside.parts] == [True, False]
    # The client stops before the announced length.
    short = read_multipart(BytesIO(data[:cut]), len(data), "b0und", tmp_path)
    assert not short.complete and f"after {cut} of {len(data)} bytes" in short.problem
    # Every part but the closing delimiter: still incomplete.
    no_close = data[:data.rindex(b"--b0und--")]
    assert not read_multipart(BytesIO(no_close), len(no_close), "b0und", tmp_path).complete


def test_multipart_garbage_is_malformed_and_leaves_no_file(tmp_path: Path) -> None:
    data = b"--b0und\r\nNo header line without colon\r\n\r\nabc\r\n--b0und--\r\n"
    with pytest.raises(MalformedMultipart):
        read_multipart(BytesIO(data), len(data), "b0und", tmp_path)
    with pytest.raises(MalformedMultipart):
        read_multipart(BytesIO(b"x" * 70000), 70000, "b0und", tmp_path)  # no boundary at all
    with pytest.raises(MalformedMultipart):
        read_multipart(BytesIO(b""), 0, "", tmp_path)  # no boundary parameter
    assert list(tmp_path.iterdir()) == []


def test_media_type_parameters_quoted_or_not() -> None:
    assert parse_media_type('Multipart/Related; type="application/dicom"; boundary="a b"') == (
        "multipart/related", {"type": "application/dicom", "boundary": "a b"})
    assert parse_media_type("multipart/related; type=application/dicom; boundary=xyz")[1]["boundary"] == "xyz"
    assert parse_media_type("")[0] == ""


def test_multipart_stream_has_its_announced_length_and_parses_back(tmp_path: Path) -> None:
    files = []
    for i, size in enumerate((0, 1, 3_000_000)):
        path = tmp_path / f"f{i}.dcm"
        path.write_bytes(bytes([i]) * size)
        files.append(path)
    stream = MultipartStream(files)
    data = b"".join(iter(lambda: stream.read(65536), b""))
    assert len(data) == len(stream)
    out = tmp_path / "out"
    out.mkdir()
    parsed = read_multipart(BytesIO(data), len(data), stream.boundary, out)
    assert parsed.complete and [p.path.read_bytes() for p in parsed.parts] == [f.read_bytes() for f in files]


def test_cstore_statuses_map_to_stow_failure_reasons() -> None:
    assert st.failure_reason(receiver.STATUS_OUT_OF_RESOURCES) == 0xA700
    # The C-STORE "cannot understand" codes keep their value: they lie in PS3.18's Cxxx range.
    for code in (receiver.STATUS_CANNOT_UNDERSTAND, receiver.STATUS_INVALID_UID, receiver.STATUS_UID_MISMATCH):
        assert st.failure_reason(code) == code and 0xC000 <= code <= 0xCFFF
    assert st.failure_reason(0x1234) == 0x0110


def test_http_status_and_response_round_trip() -> None:
    ok = st.InstanceOutcome("1.2.840.10008.5.1.4.1.1.2", "1.2.3.1", None)
    bad = st.InstanceOutcome("1.2.840.10008.5.1.4.1.1.2", "1.2.3.2", 0xC211, "SOPInstanceUID is missing")
    assert st.http_status([ok, ok]) == 200 and st.http_status([ok, bad]) == 202 and st.http_status([bad]) == 409
    for media, parse in ((st.MEDIA_JSON, st.parse_json_response), (st.MEDIA_XML, st.parse_xml_response)):
        parsed = parse(st.render([ok, bad], media))
        assert parsed.stored == {"1.2.3.1": 0} and parsed.failed == {"1.2.3.2": 0xC211}
    assert st.render([ok], st.MEDIA_JSON).startswith(b'{"00081199": {"vr": "SQ"')


def test_response_media_type_from_accept() -> None:
    assert st.response_media_type("") == st.MEDIA_JSON
    assert st.response_media_type("application/dicom+xml") == st.MEDIA_XML
    assert st.response_media_type("application/dicom+json, application/dicom+xml") == st.MEDIA_JSON
    assert st.response_media_type("*/*") == st.MEDIA_JSON
    assert st.response_media_type("image/png") is None


def test_authenticate_bearer_and_basic() -> None:
    sources = [{"name": "ris", "token_sha256": token_digest("t0ken")},
               {"name": "cloud", "password_hash": hash_password("pw", iterations=1000)}]
    basic = "Basic " + base64.b64encode(b"cloud:pw").decode()
    assert authenticate(sources, "Bearer t0ken")[0] is sources[0]
    assert authenticate(sources, basic)[0] is sources[1]
    assert authenticate(sources, "Bearer wrong") == (None, "", "unknown bearer token")
    assert authenticate(sources, "Basic " + base64.b64encode(b"cloud:nope").decode())[:2] == (None, "cloud")
    assert authenticate(sources, "Basic " + base64.b64encode(b"ris:t0ken").decode())[0] is None  # no password
    assert authenticate(sources, "Basic !!!")[0] is None
    assert authenticate(sources, "")[2] == "no credentials"
    assert is_stow_path("/dicomweb/studies") and is_stow_path("/dicomweb/studies/1.2.3")
    assert not is_stow_path("/dicomweb/studiesX")


def _dest(**keys: object) -> dict[str, object]:
    return {"name": "cloud", "type": "dicomweb", "url": "https://pacs.example/dicom-web", **keys}


def problems_of(raw: dict) -> list[str]:
    try:
        config_from_mapping(raw, "test", environ={})
    except ConfigError as exc:
        return exc.problems
    return []


def test_dicomweb_destination_keys_are_checked(tmp_path: Path) -> None:
    assert problems_of({"destinations": [_dest()]}) == []
    problems = problems_of({"destinations": [
        {"name": "a", "type": "dicomweb"},
        _dest(name="b", url="ftp://x", auth="bearer", batch_size=0, ae_title="X"),
        _dest(name="c", auth="basic"),
        _dest(name="d", auth="bearer", token_file=str(tmp_path / "missing")),
        {"name": "e", "type": "stow"},
    ]})
    assert "destinations[0].url: required key is missing (type dicomweb)" in problems
    assert any(p.startswith("destinations[1].url:") for p in problems)
    assert any(p.startswith("destinations[1].token_file: auth bearer needs exactly one") for p in problems)
    assert any(p.startswith("destinations[1].batch_size:") for p in problems)
    assert any(p.startswith("destinations[1].ae_title: not used by type dicomweb") for p in problems)
    assert "destinations[2].username: required when auth is basic" in problems
    assert "destinations[2].password_file: required when auth is basic" in problems
    assert any(p.startswith("destinations[3].token_file: file") for p in problems)
    assert any(p.startswith("destinations[4].type:") for p in problems)


def test_dicomweb_sources_are_checked() -> None:
    good = {"name": "ris", "token_sha256": "a" * 64}
    assert problems_of({"dicomweb": {"enabled": True, "sources": [good]}}) == []
    problems = problems_of({"dicomweb": {"enabled": True, "sources": [
        good, {"name": "ris", "token_sha256": "a" * 64, "password_hash": "x"}, {"name": "x:y", "token_sha256": "z"},
        {"name": "m", "ae_title": "A" * 20, "token_sha256": "b" * 64, "colour": 1}]}})
    assert "dicomweb.sources[1].name: 'ris' is used by another source" in problems
    assert any(p.startswith("dicomweb.sources[1]: needs exactly one of") for p in problems)
    assert any(p.startswith("dicomweb.sources[2].name:") for p in problems)
    assert "dicomweb.sources[2].token_sha256: malformed" in problems
    assert any(p.startswith("dicomweb.sources[3].ae_title:") for p in problems)
    assert any(p.startswith("dicomweb.sources[3]: unknown key(s) colour") for p in problems)
    assert any(p.startswith("dicomweb.sources: dicomweb.enabled is true but no source")
               for p in problems_of({"dicomweb": {"enabled": True}}))


def test_destination_credentials_are_read_at_each_try(tmp_path: Path) -> None:
    cfg = config_from_mapping({"destinations": [_dest(auth="bearer", token_env="STOW_TOKEN")]}, "t", environ={})
    dest = cfg.destinations[0]
    assert auth_headers(dest, {"STOW_TOKEN": "abc"}) == {"Authorization": "Bearer abc"}
    password = tmp_path / "pw"
    password.write_text("s3cret\n")
    dest.auth, dest.token_env, dest.username, dest.password_file = "basic", "", "node", str(password)
    assert auth_headers(dest, {}) == {"Authorization": "Basic " + base64.b64encode(b"node:s3cret").decode()}
