#!/bin/bash
# Build .devcarry/peers.tar.xz (at the repo root): dcmtk (storescu, storescp, echoscu) and Orthanc from this Debian 12 machine,
# with their whole shared-library closure (glibc and ld.so included), so that they run on a machine that has
# neither. Extracted into P, it gives P/bin/<tool> wrappers that exec P/libexec/<tool> through P/lib/ld.so.
#
#   bash bench/gpu-box/build-peers.sh            # writes .devcarry/peers.tar.xz
#   STAGE=/tmp/x bash bench/gpu-box/build-peers.sh
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd -P)
STAGE=${STAGE:-/tmp/peers-stage}
OUT=${OUT:-$HERE/../../.devcarry/peers.tar.xz}
mkdir -p "$(dirname "$OUT")"
GCONV_SRC=/usr/lib/x86_64-linux-gnu/gconv
DICT_SRC=$(ls -d /usr/share/libdcmtk*/ | head -1)
ICU_DATA_SRC=$(readlink -f /usr/lib/x86_64-linux-gnu/libicudata.so.72)
TOOLS="/usr/bin/storescu /usr/bin/storescp /usr/bin/echoscu /usr/sbin/Orthanc"

rm -rf "$STAGE"
mkdir -p "$STAGE"/{bin,lib,libexec,share/dcmtk,etc}

# 1. The tools and the ldd closure of all of them (copied under their soname, symlinks dereferenced).
for t in $TOOLS; do cp -L "$t" "$STAGE/libexec/"; done
for t in $TOOLS; do ldd "$t"; done | awk '
    $2 == "=>" && $3 ~ /^\// { print $1, $3 }
    $1 ~ /^\// && $1 ~ /ld-linux/ { n = $1; sub(/.*\//, "", n); print n, $1 }' | sort -u |
while read -r name path; do
    cp -L "$path" "$STAGE/lib/$name"
done
if ldd "$STAGE"/libexec/* | grep -q 'not found'; then echo "unresolved libraries" >&2; exit 1; fi

# 2. ICU data: libicudata (31 MB) is pulled in by libxml2 and boost_locale. Keep the same library but drop the
#    data no DICOM peer uses (see trim-icudata.py); set ICU_FULL=1 to keep all of it.
if [ "${ICU_FULL:-0}" != 1 ]; then
    python3 "$HERE/trim-icudata.py" "$ICU_DATA_SRC" "$STAGE/lib/libicudata.so.72"
fi

# 3. glibc's iconv modules (dlopen'ed, not in ldd; Orthanc converts DICOM character sets with iconv). The
#    wrappers set GCONV_PATH so that the bundled glibc never loads the host's modules. Only the modules for
#    the DICOM character sets (PS3.3 C.12.1.1.2) and the Unicode ones, plus their helper libraries.
mkdir -p "$STAGE/lib/gconv"
GCONV_MODS="ISO8859-1 ISO8859-2 ISO8859-3 ISO8859-4 ISO8859-5 ISO8859-6 ISO8859-7 ISO8859-8 ISO8859-9 ISO8859-15
    SJIS EUC-JP ISO-2022-JP EUC-KR ISO-2022-KR GB18030 GBK EUC-CN TIS-620 BIG5 UTF-7 UTF-16 UTF-32 UNICODE
    CP1252 libJIS libGB libKSC libCNS"
for m in $GCONV_MODS; do cp -L "$GCONV_SRC/$m.so" "$STAGE/lib/gconv/"; done
python3 - "$GCONV_SRC" "$STAGE/lib/gconv" <<'EOF'
# Keep only the gconv-modules lines (aliases and modules) that point at the bundled modules.
import os, sys, glob
src, dst = sys.argv[1:]
have = {f[:-3] for f in os.listdir(dst) if f.endswith(".so")}
lines = []
for conf in [f"{src}/gconv-modules"] + sorted(glob.glob(f"{src}/gconv-modules.d/*.conf")):
    for line in open(conf):
        w = line.split()
        if len(w) >= 4 and w[0] == "module" and w[3] in have:
            lines.append(line)
modules = [l.split() for l in lines]
names = {w[1] for w in modules} | {w[2] for w in modules}
for conf in [f"{src}/gconv-modules"] + sorted(glob.glob(f"{src}/gconv-modules.d/*.conf")):
    for line in open(conf):
        w = line.split()
        if len(w) == 3 and w[0] == "alias" and w[2] in names:
            lines.append(line)
open(f"{dst}/gconv-modules", "w").writelines(lines)
EOF
# glibc reads the text configuration when GCONV_PATH is set (the cache only without it).

# 4. dcmtk's data dictionaries (dcmtk and Orthanc both read DCMDICTPATH, a ':'-separated list of files).
cp "$DICT_SRC/dicom.dic" "$DICT_SRC/private.dic" "$STAGE/share/dcmtk/"

# 5. A UTC zone file: Orthanc refuses to start without /etc/localtime (boost.locale's ICU backend would crash);
#    setup.sh copies this one there when the host has none (minimal Ubuntu images ship no tzdata).
mkdir -p "$STAGE/share/zoneinfo"
cp -L /usr/share/zoneinfo/Etc/UTC "$STAGE/share/zoneinfo/UTC"

# 5b. The C.UTF-8 and en_US.UTF-8 locales, compiled by this glibc (the wrappers set LOCPATH, so the host's locale
#    archive, built by another glibc, is never read). Orthanc sets its global locale to en_US.UTF-8 as it does here
#    (without it, it logs "Cannot set globale locale" and falls back to the default one).
mkdir -p "$STAGE/share/locale"
cp -a /usr/lib/locale/C.utf8 "$STAGE/share/locale/"
localedef -i en_US -f UTF-8 "$STAGE/share/locale/en_US.utf8"
# glibc tries the name as given (en_US.UTF-8) in LOCPATH and then in /usr/lib/locale before the normalized one
# (en_US.utf8): these links make the first try hit the bundled files.
ln -s en_US.utf8 "$STAGE/share/locale/en_US.UTF-8"
ln -s C.utf8 "$STAGE/share/locale/C.UTF-8"

# 6. A minimal OpenSSL configuration, so that the bundled libcrypto 3.0 does not read the host's (and, in the
#    wrappers, a GnuTLS priority file that does not exist, as on this machine: GnuTLS reads it when loaded).
printf '# empty: the bundled OpenSSL needs no configuration\n' > "$STAGE/etc/openssl.cnf"

# 7. The wrappers.
for t in $TOOLS; do
    name=$(basename "$t")
    cat > "$STAGE/bin/$name" <<EOF
#!/bin/sh
# Runs the bundled $name (Debian 12 build) with the bundled glibc and libraries only.
P=\$(dirname "\$(dirname "\$(readlink -f "\$0")")")
export DCMDICTPATH="\$P/share/dcmtk/dicom.dic:\$P/share/dcmtk/private.dic"
export GCONV_PATH="\$P/lib/gconv"
export LOCPATH="\$P/share/locale"
export OPENSSL_CONF="\$P/etc/openssl.cnf"
export GNUTLS_SYSTEM_PRIORITY_FILE="\$P/etc/gnutls-config-absent"
unset LD_PRELOAD
exec "\$P/lib/ld-linux-x86-64.so.2" --inhibit-cache --library-path "\$P/lib" --argv0 "\$0" "\$P/libexec/$name" "\$@"
EOF
    chmod 755 "$STAGE/bin/$name"
done

# 8. Pack (xz's x86 BCJ filter gains under 0.1% on this mix, so plain -9e).
chmod -R u+rwX,go+rX "$STAGE"
tar -C "$STAGE" --owner=0 --group=0 --numeric-owner --sort=name -cf - . | xz -9e -T1 > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
ls -l "$OUT"
