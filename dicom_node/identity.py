"""The node's one identity on the wire and in files: Implementation Class UID, version name, manufacturer.

Every association the node opens or accepts (:func:`application_entity`), every file it writes (received
instances' file meta, derived instances' file meta) and the conformance statement carry the same values; the loop
guard recognises the node's own output by :data:`NODE_MANUFACTURER` in ContributingEquipmentSequence.
"""

from __future__ import annotations

from typing import Any

from pynetdicom import AE

from dicom_node import __version__

#: Implementation Class UID of dicom-node (PS3.7 D.3.3.2), under pydicom's UID root for implementations.
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.77701"
#: Implementation Version Name (SH, at most 16 characters).
IMPLEMENTATION_VERSION_NAME = f"DICOMNODE_{__version__}"[:16]
#: Both, as the file-meta and association writers take them.
IMPLEMENTATION = (IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)
#: Manufacturer written into ContributingEquipmentSequence of derived series; the loop guard looks for it.
NODE_MANUFACTURER = "dicom-node"


def application_entity(ae_title: str) -> Any:
    """A pynetdicom ``AE`` that presents the node's identity (pynetdicom's own is ``PYNETDICOM_304``)."""
    ae = AE(ae_title=ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return ae
