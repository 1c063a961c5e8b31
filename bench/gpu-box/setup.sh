# Source this from the repo root on a machine without dcmtk, Orthanc or internet:
#     source bench/gpu-box/setup.sh        (after bench/gpu-box/make-carry.sh here; carry .devcarry)
# It unpacks dcmtk (storescu, storescp, echoscu) and Orthanc, built for Debian 12 and carrying their own glibc and
# libraries (peers.tar.xz), into /tmp/peers; installs the Python wheels in whl/ (cp312) into /tmp/site; and puts
# both first on PATH and PYTHONPATH, with the repo itself on PYTHONPATH (so `python3 -m dicom_node` works).
# How it is built: README.md next to this file.
# No `set -e` here: it is sourced, and would then close the caller's shell on any error.

_dc_root=$(cd "$(dirname "${BASH_SOURCE[0]:-bench/gpu-box/setup.sh}")/../.." && pwd)
_dc_dir=$_dc_root/.devcarry

_dc_setup() {
    rm -rf /tmp/peers /tmp/site && mkdir -p /tmp/peers || return 1
    if command -v xz >/dev/null 2>&1; then
        tar -C /tmp/peers -xJf "$_dc_dir/peers.tar.xz" || return 1
    else  # no xz(1): Python's tarfile reads .tar.xz itself
        python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="tar")' \
            "$_dc_dir/peers.tar.xz" /tmp/peers || return 1
    fi
    if [ ! -e /etc/localtime ]; then  # Orthanc exits without it ("install tzdata"); minimal images lack it
        rm -f /etc/localtime  # a dangling link
        cp /tmp/peers/share/zoneinfo/UTC /etc/localtime && echo "devcarry: created /etc/localtime (UTC)"
    fi
    if python3 -m pip --version >/dev/null 2>&1; then
        PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
            "$_dc_dir"/whl/*.whl || return 1
    else  # no pip: these wheels have no .data or scripts to install, unzipping them is the same
        echo "devcarry: no pip, unzipping the wheels into /tmp/site"
        python3 -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall("/tmp/site") for w in sys.argv[1:]]' \
            "$_dc_dir"/whl/*.whl || return 1
    fi
    export PATH=/tmp/peers/bin:$PATH
    export PYTHONPATH=/tmp/site:$_dc_root${PYTHONPATH:+:$PYTHONPATH}
    storescu --version | head -1
    Orthanc --version | head -1
    python3 -c 'import pydicom, pynetdicom, sqlalchemy, alembic, mako, dicom_node
print("python", __import__("sys").version.split()[0], "pydicom", pydicom.__version__, "pynetdicom", pynetdicom.__version__,
      "sqlalchemy", sqlalchemy.__version__, "alembic", alembic.__version__)'
}

if _dc_setup; then
    echo "devcarry: ready (PATH and PYTHONPATH set)"
else
    echo "devcarry: setup FAILED" >&2
fi
unset -f _dc_setup
unset _dc_dir _dc_root
