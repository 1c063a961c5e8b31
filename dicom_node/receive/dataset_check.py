"""Structural check of an encoded dataset before it is acknowledged.

pydicom reads leniently: a truncated value or a length that runs past the end of the data is silently cut short.
A receiver that acknowledges such a file has "stored" an instance that nobody can read. This module walks the
encoded elements (PS3.5 7.1 and 7.5) without decoding values and reports the first structural defect: a header
or value that runs past the end, an unknown explicit VR, an undefined length where the standard allows none, or
items and delimiters out of place. It costs about a microsecond per element.
"""

from __future__ import annotations

import struct
import zlib

#: Value representations of PS3.5 6.2.
KNOWN_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
#: VRs that may have an undefined length (sequences, encapsulated pixel data, UN holding a sequence).
UNDEFINED_LENGTH_VRS = frozenset(b"SQ OB OW UN".split())

UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
MAX_DEPTH = 32


class MalformedDataset(ValueError):
    """The encoded dataset is structurally broken; the message says where and how."""


def inflate(data: bytes | memoryview) -> bytes:
    """Inflate a Deflated Explicit VR Little Endian dataset (raw deflate, RFC 1951; PS3.5 A.5)."""
    try:
        return zlib.decompress(bytes(data), -zlib.MAX_WBITS)
    except zlib.error as exc:
        raise MalformedDataset(f"deflated dataset does not inflate: {exc}") from exc


def check_dataset_structure(data: bytes | memoryview, implicit_vr: bool, little_endian: bool) -> int:
    """Walk every element of an encoded dataset and return how many there are.

    Parameters
    ----------
    data : bytes or memoryview
        The encoded dataset without preamble or file meta (as carried by a C-STORE, PS3.7 9.1.1).
    implicit_vr, little_endian : bool
        The transfer syntax's encoding.

    Raises
    ------
    MalformedDataset
        At the first structural defect, naming the tag and byte offset.
    """
    buf = memoryview(data)
    order = "<" if little_endian else ">"
    if not implicit_vr and len(buf) >= 6 and bytes(buf[4:6]) not in KNOWN_VRS:
        # Like pydicom and dcmtk, accept a dataset whose first element shows it was written in implicit VR
        # although an explicit syntax was announced: a common sender bug, and the data is still readable.
        implicit_vr = True
    walker = _Walker(buf, implicit_vr, order)
    end = walker.walk_elements(0, len(buf), depth=0, in_item=False)
    if end != len(buf):  # pragma: no cover - walk_elements consumes to its end or raises
        raise MalformedDataset(f"{len(buf) - end} trailing bytes after the last element")
    return walker.count


def _shown_vr(vr: bytes) -> str:
    """An unknown VR for a message: its letters when printable, else its bytes in hex (``repr`` would put
    backslashes into an Error Comment, whose value separator they are)."""
    text = vr.decode("latin-1")
    return f"'{text}'" if all("!" <= c <= "~" and c not in "\\'" for c in text) else f"0x{vr.hex().upper()}"


class _Walker:
    def __init__(self, buf: memoryview, implicit_vr: bool, order: str) -> None:
        self.buf = buf
        self.implicit = implicit_vr
        self.u16 = struct.Struct(order + "H")
        self.u32 = struct.Struct(order + "I")
        self.tag = struct.Struct(order + "HH")
        self.count = 0

    def _read_tag(self, pos: int, end: int) -> int:
        if pos + 8 > end:
            raise MalformedDataset(
                f"element header at byte {pos} runs past the end of the data ({end - pos} bytes left)")
        group, elem = self.tag.unpack_from(self.buf, pos)
        return (group << 16) | elem

    def walk_elements(self, pos: int, end: int, depth: int, in_item: bool) -> int:
        """Walk elements from ``pos``; stop at ``end`` or, inside an undefined-length item, its delimiter."""
        if depth > MAX_DEPTH:
            raise MalformedDataset(f"sequences nested deeper than {MAX_DEPTH} levels at byte {pos}")
        while pos < end:
            tag = self._read_tag(pos, end)
            if tag == ITEM_DELIMITER:
                if not in_item:
                    raise MalformedDataset(f"item delimiter outside an item at byte {pos}")
                return pos + 8
            if tag in (ITEM, SEQUENCE_DELIMITER):
                raise MalformedDataset(
                    f"item tag ({tag >> 16:04X},{tag & 0xFFFF:04X}) outside a sequence at byte {pos}")
            pos = self._walk_element(tag, pos, end, depth)
            self.count += 1
        if in_item and end == len(self.buf):
            raise MalformedDataset("undefined-length item has no item delimiter before the end of the data")
        return pos

    def _walk_element(self, tag: int, pos: int, end: int, depth: int) -> int:
        where = f"({tag >> 16:04X},{tag & 0xFFFF:04X}) at byte {pos}"
        if self.implicit:
            vr = None  # implicit VR: only the dictionary knows it; lengths are still checked
            length = self.u32.unpack_from(self.buf, pos + 4)[0]
            value_pos = pos + 8
        else:
            vr = bytes(self.buf[pos + 4:pos + 6])
            if vr not in KNOWN_VRS:
                raise MalformedDataset(f"element {where} has unknown VR {_shown_vr(vr)}")
            if vr in LONG_VRS:
                if pos + 12 > end:
                    raise MalformedDataset(f"element {where}: header runs past the end of the data")
                length = self.u32.unpack_from(self.buf, pos + 8)[0]
                value_pos = pos + 12
            else:
                length = self.u16.unpack_from(self.buf, pos + 6)[0]
                value_pos = pos + 8
        if length != UNDEFINED:
            if value_pos + length > end:
                raise MalformedDataset(
                    f"element {where} declares {length} bytes but only {end - value_pos} remain"
                )
            if vr == b"SQ" and length:
                self._walk_items(value_pos, value_pos + length, depth, where)
            return value_pos + length
        # Undefined length: a sequence (or encapsulated pixel data) closed by a sequence delimiter.
        if vr is not None and vr not in UNDEFINED_LENGTH_VRS:
            raise MalformedDataset(f"element {where} with VR {vr.decode()} has an undefined length")
        if tag == PIXEL_DATA or vr in (b"OB", b"OW"):
            return self._walk_fragments(value_pos, end, where)
        return self._walk_items(value_pos, end, depth, where, undefined=True)

    def _walk_items(self, pos: int, end: int, depth: int, where: str, undefined: bool = False) -> int:
        while pos < end:
            tag = self._read_tag(pos, end)
            length = self.u32.unpack_from(self.buf, pos + 4)[0]
            if tag == SEQUENCE_DELIMITER:
                if not undefined:
                    raise MalformedDataset(f"sequence delimiter inside the defined-length sequence {where}")
                return pos + 8
            if tag != ITEM:
                raise MalformedDataset(
                    f"sequence {where} holds ({tag >> 16:04X},{tag & 0xFFFF:04X}) at byte {pos} where an item belongs"
                )
            pos += 8
            if length == UNDEFINED:
                pos = self.walk_elements(pos, end, depth + 1, in_item=True)
            else:
                if pos + length > end:
                    raise MalformedDataset(f"item at byte {pos - 8} in {where} runs past the end of its sequence")
                self.walk_elements(pos, pos + length, depth + 1, in_item=False)
                pos += length
        if undefined:
            raise MalformedDataset(f"undefined-length sequence {where} has no sequence delimiter")
        return pos

    def _walk_fragments(self, pos: int, end: int, where: str) -> int:
        while True:
            tag = self._read_tag(pos, end)
            length = self.u32.unpack_from(self.buf, pos + 4)[0]
            if tag == SEQUENCE_DELIMITER:
                return pos + 8
            if tag != ITEM or length == UNDEFINED:
                raise MalformedDataset(f"encapsulated data {where}: bad fragment at byte {pos}")
            if pos + 8 + length > end:
                raise MalformedDataset(f"encapsulated data {where}: fragment at byte {pos} runs past the end")
            pos += 8 + length
