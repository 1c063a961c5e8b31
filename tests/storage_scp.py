"""A pynetdicom storage SCP run as its own process, for tests that need to know which association stored what.

    python -m tests.storage_scp PORT MAXIMUM_ASSOCIATIONS RECORD_FILE

Every stored instance appends ``<association number> <SOP Instance UID>`` to RECORD_FILE. Associations beyond
MAXIMUM_ASSOCIATIONS are rejected (local limit exceeded), as a PACS with a per-AE association limit does. It
runs in a process of its own because the node's exporter replaces pynetdicom's association class in the process
that sends, and pynetdicom counts only associations of that class against the limit.
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import cast

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE


def main(port: int, maximum_associations: int, record: str) -> None:
    count = 0
    lock = threading.Lock()
    out = open(record, "a", encoding="ascii", buffering=1)

    numbers: weakref.WeakKeyDictionary[Association, int] = weakref.WeakKeyDictionary()  # association -> 1, 2...

    def store(event: evt.Event) -> int:
        nonlocal count
        with lock:
            if event.assoc not in numbers:
                count += 1
                numbers[event.assoc] = count
            request = cast(C_STORE, event.request)
            out.write(f"{numbers[event.assoc]} {request.AffectedSOPInstanceUID}\n")
        return 0x0000

    ae = AE(ae_title="LANES")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.maximum_associations = maximum_associations
    ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    # Ready, said without a test connection: a bare TCP probe would hold an association slot until it times out.
    print("listening", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
