#!/usr/bin/env python3
"""Strip the debug information from the compiled extensions inside wheels, in place (RECORD rewritten).

    python3 bench/gpu-box/strip-wheels.py .devcarry/whl/*.whl

SQLAlchemy's manylinux wheels ship their Cython extensions with DWARF debug info (the cp312 wheel: 4.7 MB,
2.5 MB stripped). ``strip --strip-debug`` removes only .debug_* sections: the code, the dynamic symbols and the
symbol table stay, so the modules behave the same. Wheels without such files are left untouched.
"""

import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def strip_wheel(path: str) -> None:
    with zipfile.ZipFile(path) as zin:
        infos = zin.infolist()
        contents = {i.filename: zin.read(i) for i in infos}
    changed = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in contents.items():
            if name.endswith(".so") and b".debug_info" in data:
                f = os.path.join(tmp, "x.so")
                with open(f, "wb") as out:
                    out.write(data)
                subprocess.run(["strip", "--strip-debug", f], check=True)
                with open(f, "rb") as src:
                    changed[name] = src.read()
    if not changed:
        print(f"{os.path.basename(path)}: nothing to strip")
        return
    contents.update(changed)
    record = next(n for n in contents if n.endswith(".dist-info/RECORD"))
    lines = []
    for line in contents[record].decode().splitlines():
        name = line.rsplit(",", 2)[0]
        if name in changed:
            line = f"{name},{record_hash(changed[name])},{len(changed[name])}"
        lines.append(line)
    contents[record] = ("\n".join(lines) + "\n").encode()
    tmp_path = path + ".tmp"
    with zipfile.ZipFile(tmp_path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for info in infos:  # same order and metadata (mode bits), new data
            zi = zipfile.ZipInfo(info.filename, info.date_time)
            zi.external_attr, zi.compress_type = info.external_attr, zipfile.ZIP_DEFLATED
            zout.writestr(zi, contents[info.filename])
    before = os.path.getsize(path)
    os.replace(tmp_path, path)
    print(f"{os.path.basename(path)}: stripped {len(changed)} extensions, {before} -> {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        strip_wheel(p)
