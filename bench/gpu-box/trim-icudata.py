#!/usr/bin/env python3
"""Rebuild libicudata.so.72 without the ICU data that no DICOM peer uses, to keep peers.tar.xz small.

    python3 trim-icudata.py /usr/lib/x86_64-linux-gnu/libicudata.so.72.1 OUT/libicudata.so.72

libicudata holds one ICU "common data" archive (symbol icudt72_dat): a header, a table of contents sorted by
name, and 16-byte aligned items. Dropped (the same cuts ICU's own data filter offers; ICU falls back cleanly):
  - brkitr/*.dict: word-break dictionaries for CJK, Thai, Lao, Khmer, Burmese text (~2 MB compressed);
    break iterators fall back to their rules.
  - coll/* tailorings other than root (the root collation and ucadata.icu stay); ucol_open(x) gives root.
  - translit/*: transliterator rules (icu::Transliterator only; boost.locale and libxml2 do not use it).
Everything else (converters, normalization, properties, locale, zone, currency, unit data) stays.
"""

import struct
import subprocess
import sys
import tempfile
from pathlib import Path

SYMBOL = "icudt72_dat"


def elf_symbol(lib: bytes, name: str) -> tuple[int, int]:
    """File offset and size of dynamic symbol ``name`` in a little-endian ELF64 shared library."""
    shoff, = struct.unpack_from("<Q", lib, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", lib, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", lib, shoff + i * shentsize) for i in range(shnum)]
    dynsym = next(s for s in sections if s[1] == 11)  # SHT_DYNSYM
    dynstr = sections[dynsym[6]]
    for off in range(dynsym[4], dynsym[4] + dynsym[5], 24):
        st_name, _, _, st_shndx, st_value, st_size = struct.unpack_from("<IBBHQQ", lib, off)
        sym = lib[dynstr[4] + st_name:lib.index(b"\0", dynstr[4] + st_name)].decode()
        if sym == name:
            sec = sections[st_shndx]  # vaddr -> file offset through the symbol's section
            return st_value - sec[3] + sec[4], st_size
    raise SystemExit(f"{name} not found")


def keep(name: str) -> bool:
    path = name.split("/", 1)[1]  # drop "icudt72l/"
    if path.startswith("brkitr/") and path.endswith(".dict"):
        return False
    if path.startswith("coll/"):
        return path in ("coll/root.res", "coll/en.res", "coll/ucadata.icu", "coll/res_index.res")
    if path.startswith("translit/"):
        return False
    return True


def main() -> None:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    lib = src.read_bytes()
    off, size = elf_symbol(lib, SYMBOL)
    data = lib[off:off + size]
    header_size, magic1, magic2 = struct.unpack_from("<HBB", data, 0)
    if (magic1, magic2) != (0xDA, 0x27) or data[12:16] != b"CmnD":
        raise SystemExit(f"{src}: {SYMBOL} is not ICU common data")
    header = data[:header_size]
    toc = data[header_size:]
    count, = struct.unpack_from("<I", toc, 0)
    entries = [struct.unpack_from("<II", toc, 4 + 8 * i) for i in range(count)]
    items = []
    for i, (name_off, data_off) in enumerate(entries):
        name = toc[name_off:toc.index(b"\0", name_off)].decode()
        end = entries[i + 1][1] if i + 1 < count else len(toc)
        items.append((name, toc[data_off:end]))
    kept = [(n, d) for n, d in items if keep(n)]  # the order (sorted by name) is kept

    names = b"".join(n.encode() + b"\0" for n, _ in kept)
    names_start = 4 + 8 * len(kept)
    data_start = names_start + len(names)
    data_start += -data_start % 16
    offsets, pos = [], data_start
    body = bytearray()
    name_pos = names_start
    for n, d in kept:
        d = d + b"\0" * (-len(d) % 16)
        offsets.append((name_pos, pos))
        name_pos += len(n) + 1
        body += d
        pos += len(d)
    new_toc = struct.pack("<I", len(kept)) + b"".join(struct.pack("<II", *o) for o in offsets) + names
    new_toc += b"\0" * (data_start - len(new_toc))
    blob = header + new_toc + bytes(body)
    if len(header) % 16:
        raise SystemExit(f"{src}: ICU header of {len(header)} bytes, not a multiple of 16")

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "icudata.bin").write_bytes(blob)
        Path(tmp, "icudata.S").write_text(
            f'.section .rodata\n.globl {SYMBOL}\n.type {SYMBOL}, @object\n.balign 16\n{SYMBOL}:\n'
            f'.incbin "{tmp}/icudata.bin"\n.size {SYMBOL}, .-{SYMBOL}\n'
            '.section .note.GNU-stack,"",@progbits\n')
        subprocess.run(["gcc", "-shared", "-nostdlib", "-Wl,-soname,libicudata.so.72", "-Wl,-z,noexecstack",
                        "-Wl,--hash-style=both", "-o", str(dst), f"{tmp}/icudata.S"], check=True)
    print(f"{src.name}: {count} items, {len(data)} bytes -> {len(kept)} items, {len(blob)} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
