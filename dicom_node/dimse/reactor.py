"""Event-driven reactor loops for pynetdicom's association acceptor.

pynetdicom 3.0 polls: the association thread sleeps 1 ms before every look at its DIMSE queue, and the DUL thread
sleeps 1 ms whenever it has no event, before it looks at the socket and at the queue of PDUs to send. With a
scanner that waits for each C-STORE response before it sends the next request, those sleeps sit on the critical
path twice per instance (request received -> handler; response queued -> sent), about 1 ms per instance on
average, 10-15 % of the time a 512x512 CT slice takes.

This module keeps pynetdicom's loops and state machine and replaces only the waiting:

- the association thread waits on a :class:`threading.Event` that is set whenever something is put on the DIMSE
  message queue or on the DUL's queue of primitives for the user (release and abort requests);
- the DUL thread waits in ``select`` on the socket and on a wake-up socket pair that is written whenever a
  primitive is queued to be sent (a C-STORE response) or the thread is asked to stop.

Both waits are bounded (``MAX_WAIT_SECONDS``) so pynetdicom's timers (ARTIM, network idle timeout) are still
checked. The two loop bodies are copies of pynetdicom 3.0's ``Association._run_reactor`` and
``DULServiceProvider.run_reactor`` with only the wait changed, and ``RequestHandler._create_association`` is
copied too. :data:`UPSTREAM_SOURCE_SHA256` records the source hash of every pynetdicom original this module copies
or overrides, as of :data:`UPSTREAM_PYNETDICOM_VERSION` (the exact version ``pyproject.toml`` pins);
``tests/unit/test_pynetdicom_fence.py`` fails, naming the method, when an installed pynetdicom differs.

All of it is optional: with ``node.dimse_fast_path = false`` the node runs stock pynetdicom (its own server,
associations and encoders), only the host allow-list being checked at accept (:class:`AllowListServer`).
:func:`use_event_driven_requestors` is called once, by ``Node.start``, when the fast path is on.

The server (:class:`EventDrivenServer`) also decides which TCP connections may become associations
(:class:`ConnectionGate`: host allow-list, a cap per host and a timeout for connections that have not associated
yet), and every Error Comment the node sends is made one valid LO value by :func:`error_comment`.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import ipaddress
import itertools
import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from copy import copy
from datetime import datetime
from typing import Any, cast

import pynetdicom.ae
from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom._handlers import standard_dimse_sent_handler
from pynetdicom.association import Association
from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE, DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_node.encoding import command_element, command_set, command_uid, command_ushort, padded_text

LOGGER = logging.getLogger(__name__)
_PYNETDICOM_LOGGER = logging.getLogger("pynetdicom")

#: Longest a reactor waits without news, so that pynetdicom's timers are still checked often enough.
MAX_WAIT_SECONDS = 0.01

#: The pynetdicom release whose sources :data:`UPSTREAM_SOURCE_SHA256` was taken from and the copies below were
#: checked against; ``pyproject.toml`` pins exactly this version.
UPSTREAM_PYNETDICOM_VERSION = "3.0.4"

#: SHA-256 of ``inspect.getsource`` of each pynetdicom function this module copies (``Association._run_reactor``,
#: ``DULServiceProvider.run_reactor``, ``RequestHandler._create_association``), overrides, or depends on the body
#: of (the ``__init__`` whose attributes the subclasses replace; ``AE.associate``, which builds the association by
#: the module-level name :func:`use_event_driven_requestors` replaces). To move to a new pynetdicom: read the
#: upstream change of each method whose hash differs, port it here, then update its hash and the version above.
UPSTREAM_SOURCE_SHA256: dict[str, str] = {
    "pynetdicom.ae.ApplicationEntity.associate":
        "dbc8cf47090386b2068817f6e65e39ca2c0d5b8fd80f6b9b7a322d37b85b2985",
    "pynetdicom.association.Association.__init__":
        "eb07516b8009ad8fa338201dea39578380fbf9f2c59fa5e368e20250eb97c4ea",
    "pynetdicom.association.Association._run_reactor":
        "f28838c5559e462a563750cfc9f3790027f4bb7e2223baf42c9f5d682c359dee",
    "pynetdicom.association.Association.kill":
        "8f9713666a7f4cffd840899f023090e9786668945a7c844f99d7a834077c3972",
    "pynetdicom.association.Association.run_reactor":
        "ed8bbbe3b3d6ddaee3e8673ba25b2ab2a4c45f25bc1d8ae7b48ebafd09499e6d",
    "pynetdicom.dimse.DIMSEServiceProvider.send_msg":
        "a839cf2fb46976d9da29cf06fea41c04416b38d14fab612af12e5d869bd5b3f0",
    "pynetdicom.dul.DULServiceProvider.__init__":
        "c82dafa9438ddf70685917cb15d2bfbc814aa0ad5233ffb0ae650faedc7570f0",
    "pynetdicom.dul.DULServiceProvider._send":
        "a850a7919e68484ef6751ee7a199b3ba4a911b5cbf0c2928bf796c55539254d4",
    "pynetdicom.dul.DULServiceProvider.kill_dul":
        "5ceccf8dd01c2072c377d18bb1be284941a345bd40f03bd1e03a864ab0817842",
    "pynetdicom.dul.DULServiceProvider.run_reactor":
        "e3a10eb3a0931e4854af33b9496e92d9679522aca26b0e04da8967559b9e2803",
    "pynetdicom.dul.DULServiceProvider.stop_dul":
        "28a7e0be126e7b306369cc1b131daec8e907d21d0f5692930133b6599b8c6e5f",
    "pynetdicom.transport.AssociationServer.__init__":
        "edacb98bdfb7b9744194698d47fa51d4e2d5c9ed02ef5fb5181f381b31118423",
    "pynetdicom.transport.AssociationServer.get_request":
        "925a4f3a3042f6e4b944505d06dc19c41e10ff7dec5385c794d62d31fd000300",
    "pynetdicom.transport.AssociationServer.shutdown":
        "e8e2c3a41009886d8544d17ce01118a81bac81b612a1d17f30fc200971f41db9",
    "pynetdicom.transport.RequestHandler._create_association":
        "05c8d12b79863cdbdb901ce37187b7030a0434c5cd89d219ed0bedbda679a61e",
    "pynetdicom.transport.ThreadedAssociationServer.process_request_thread":
        "9e76e9b9c8a3d8b18bb1df7ac652c86f21b4aaaf39e10deca9312f91a7c21a8a",
}


def upstream_source_sha256(qualified_name: str) -> str:
    """SHA-256 (hex) of the installed source of ``qualified_name`` (``module.Class.method``), as recorded in
    :data:`UPSTREAM_SOURCE_SHA256`.

    Parameters
    ----------
    qualified_name : str
        For example ``"pynetdicom.dul.DULServiceProvider.run_reactor"``; the method must be defined in that class
        itself, not inherited.

    Returns
    -------
    str
        The hex digest of ``inspect.getsource`` of the function, encoded as UTF-8.
    """
    module_name, class_name, attribute = qualified_name.rsplit(".", 2)
    function = vars(getattr(importlib.import_module(module_name), class_name))[attribute]
    return hashlib.sha256(inspect.getsource(function).encode("utf-8")).hexdigest()


class WakingQueue(queue.Queue):
    """A :class:`queue.Queue` that calls ``wake`` after every ``put``."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class EventDrivenDUL(DULServiceProvider):
    """DUL service provider whose reactor waits in ``select`` instead of sleeping 1 ms."""

    def __init__(self, assoc: Association, wake_association: Callable[[], None]) -> None:
        super().__init__(assoc)
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._waiting = False
        #: Serialises writes to the socket between this thread and :class:`DirectSendDIMSE`.
        self.send_lock = threading.Lock()
        self.to_provider_queue = WakingQueue(self.wake)
        self.to_user_queue = WakingQueue(wake_association)

    def wake(self) -> None:
        """Make the reactor look at its queues now (a no-op unless it is waiting, which saves a system call per
        PDU while it is busy)."""
        if not self._waiting:
            return
        try:
            self._wake_writer.send(b"\x00")
        except (BlockingIOError, OSError):
            pass  # already has a pending wake-up, or closed at the end of the association

    def _send(self, pdu: Any) -> None:
        with self.send_lock:
            super()._send(pdu)

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self.wake()
            self.join()
            return True
        return False

    def _wait_for_work(self) -> None:
        """Wait until the socket has data, a primitive is queued, or ``MAX_WAIT_SECONDS`` passed."""
        transport = self.socket
        sock = getattr(transport, "socket", None)
        if sock is None or not getattr(transport, "_is_connected", False):
            time.sleep(self._run_loop_delay)
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes are buffered where select cannot see them
        # Announce the wait before the last look at the queue: a primitive queued after that look finds
        # ``_waiting`` set and writes a wake-up byte, so it is never missed.
        self._waiting = True
        try:
            if not self.to_provider_queue.empty() or self._kill_thread:
                return
            readable, _, _ = select.select([sock, self._wake_reader], [], [], MAX_WAIT_SECONDS)
        except (OSError, ValueError):
            time.sleep(self._run_loop_delay)  # the transport is closing; its own checks report it
            return
        finally:
            self._waiting = False
        if self._wake_reader in readable:
            try:
                while self._wake_reader.recv(4096):
                    pass
            except (BlockingIOError, OSError):
                pass

    def run_reactor(self) -> None:
        """pynetdicom 3.0's ``DULServiceProvider.run_reactor`` with the idle sleep replaced by a wait."""
        self._idle_timer.start()
        sleep = False
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                    sleep = True
                if sleep:
                    self._wait_for_work()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:
                    LOGGER.error("Exception in DUL.run(), aborting association")
                    LOGGER.exception(exc)
                    abort_pdu = A_ABORT_RQ()
                    abort_pdu.source = 0x02
                    abort_pdu.reason_diagnostic = 0x00
                    cast(AssociationSocket, self.socket).send(abort_pdu.encode())
                    self.assoc.is_aborted = True
                    self.assoc.is_established = False
                    self.assoc._kill = True
                    self._kill_thread = True
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    sleep = True
                    continue
                self.state_machine.do_action(event)
                sleep = False
        finally:
            self._wake_reader.close()
            self._wake_writer.close()


def encode_p_data(pdata: Any) -> bytes:
    """Encode a P-DATA primitive as a P-DATA-TF PDU (PS3.8 9.3.5): type 04H, length, then one item per PDV
    (item length, presentation context ID, message control header + fragment)."""
    return _p_data_tf(b"".join(struct.pack(">IB", len(value) + 1, context_id) + bytes(value)
                               for context_id, value in pdata.presentation_data_value_list))


def _p_data_tf(items: bytes) -> bytes:
    """The P-DATA-TF PDU header (type 04H, reserved, length) in front of encoded PDV items."""
    return struct.pack(">BBI", 0x04, 0x00, len(items)) + items


#: Longest Error Comment (0000,0902): VR LO, 64 characters (PS3.7 C.4, PS3.5 6.2).
ERROR_COMMENT_LENGTH = 64


def error_comment(reason: object) -> str:
    """Make ``reason`` a valid Error Comment: one LO value of printable ASCII, at most 64 characters.

    Every Error Comment the node sends goes through here. A backslash is LO's value separator, so a reason that
    quotes raw bytes (Python's ``repr`` of ``b"\\x01"``) would reach the sender as several values; control and
    non-ASCII characters are outside the default character repertoire a command set is read in. Backslashes
    become ``/``, other such characters ``?``, runs of white space one space. Several values (a pydicom
    ``MultiValue``) are joined with ``/``.

    Parameters
    ----------
    reason : object
        The reason, usually a ``str``.

    Returns
    -------
    str
        The comment, possibly empty.
    """
    if isinstance(reason, (list, tuple)) or type(reason).__name__ == "MultiValue":
        reason = "/".join(str(value) for value in cast(Iterable[object], reason))
    text = "".join("/" if c == "\\" else c if " " <= c <= "~" else " " if c.isspace() else "?" for c in str(reason))
    return " ".join(text.split())[:ERROR_COMMENT_LENGTH].rstrip()


def encode_c_store_rsp(primitive: Any) -> bytes | None:
    """The command set of a C-STORE response (PS3.7 9.3.1.2), or ``None`` when it carries more than this handles.

    pynetdicom encodes a response by building a pydicom Dataset and writing it (about 1 ms of Python per
    instance on the 2-core test machine); the command set of a C-STORE-RSP is seven fixed elements.
    """
    status = primitive.Status
    if (status is None or primitive.OffendingElement or primitive.MessageIDBeingRespondedTo is None
            or not primitive.AffectedSOPClassUID or not primitive.AffectedSOPInstanceUID):
        return None
    try:
        return command_set(
            command_uid(0x0002, primitive.AffectedSOPClassUID),
            command_ushort(0x0100, 0x8001),  # Command Field: C-STORE-RSP
            command_ushort(0x0120, primitive.MessageIDBeingRespondedTo),
            command_ushort(0x0800, 0x0101),  # Command Data Set Type: no data set
            command_ushort(0x0900, int(status)),
            command_element(0x0902, padded_text(error_comment(primitive.ErrorComment), b" "))
            if primitive.ErrorComment else b"",
            command_uid(0x1000, primitive.AffectedSOPInstanceUID),
        )
    except (UnicodeEncodeError, struct.error):
        return None


def encode_c_store_rq(primitive: Any) -> bytes | None:
    """The command set of a C-STORE request (PS3.7 9.3.1.1) whose data set follows, or ``None`` when it carries
    more than this handles (a Move Originator, a missing field).

    The requestor's counterpart of :func:`encode_c_store_rsp`: pynetdicom builds a pydicom Dataset for each
    request and writes it, about a quarter of the export's Python time per instance.
    """
    if (primitive.MessageIDBeingRespondedTo is not None or primitive.MessageID is None
            or not primitive.AffectedSOPClassUID or not primitive.AffectedSOPInstanceUID
            or primitive.MoveOriginatorApplicationEntityTitle or primitive.MoveOriginatorMessageID is not None):
        return None
    try:
        return command_set(
            command_uid(0x0002, primitive.AffectedSOPClassUID),
            command_ushort(0x0100, 0x0001),  # Command Field: C-STORE-RQ
            command_ushort(0x0110, primitive.MessageID),
            command_ushort(0x0700, int(primitive.Priority)),
            command_ushort(0x0800, 0x0001),  # Command Data Set Type: a data set follows
            command_uid(0x1000, primitive.AffectedSOPInstanceUID),
        )
    except (UnicodeEncodeError, struct.error, TypeError, ValueError):
        return None


def file_data_set_p_data_tfs(context_id: int, path: Any, offset: int, maximum_pdu_size: int) -> Iterator[bytes]:
    """P-DATA-TF PDUs carrying the data set stored in ``path`` from ``offset`` on, as pynetdicom fragments it:
    ``maximum_pdu_size - 6`` bytes per PDV (all in one when the peer sets no maximum), the last one flagged."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = memoryview(f.read())
    size = len(data) if not maximum_pdu_size else maximum_pdu_size - 6
    starts = range(0, len(data), size) if len(data) else range(1)
    for start in starts:
        fragment = data[start:start + size]
        last = start + size >= len(data)
        yield _p_data_tf(struct.pack(">IBB", len(fragment) + 2, context_id, 0x02 if last else 0x00)
                         + fragment.tobytes())


#: PDUs are handed to the socket in blocks of about this size: a CT slice to a peer with a 16 KiB maximum PDU is
#: 33 PDUs, and one ``send`` each cost more Python and system time than the copy into one block.
SEND_BLOCK_BYTES = 1 << 20


def joined(pdus: Iterable[bytes], limit: int) -> Iterator[bytes]:
    """Consecutive PDUs concatenated into blocks of at least ``limit`` bytes (the last one may be smaller)."""
    block: list[bytes] = []
    size = 0
    for pdu in pdus:
        block.append(pdu)
        size += len(pdu)
        if size >= limit:
            yield b"".join(block)
            block, size = [], 0
    if block:
        yield b"".join(block)


def command_p_data_tf(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF PDU holding a whole command set in one PDV (message control header 03H: command, last)."""
    return _p_data_tf(struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command)


class DirectSendDIMSE(DIMSEServiceProvider):
    """DIMSE provider that writes its P-DATA PDUs to the socket itself, from the calling thread.

    pynetdicom hands every P-DATA fragment to the DUL thread through a queue and its state machine; a CT slice
    sent to a PACS with a 16 KiB maximum PDU is 32 fragments, and that hand-over cost more Python time per slice
    than the C-STORE itself. In state Sta6 (association established) the state machine's only action for a
    P-DATA request is to send the PDU (DT-1, PS3.8 9.2), so doing it here changes nothing else; writes are
    serialised with the DUL thread's own by the DUL's ``send_lock``. C-STORE responses, the one message an SCP
    sends per received instance, are encoded by :func:`encode_c_store_rsp`, and C-STORE requests that send a
    file as stored (the export) by :func:`encode_c_store_rq` and :func:`file_data_set_p_data_tfs`, unless
    someone listens for ``EVT_DIMSE_SENT`` (pynetdicom's own listener only logs at DEBUG level).
    """

    def _sent_is_watched(self) -> bool:
        handlers = self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        if not isinstance(handlers, list):
            handlers = [handlers]
        if any(handler is not standard_dimse_sent_handler for handler, _args in handlers):
            return True
        return bool(handlers) and _PYNETDICOM_LOGGER.isEnabledFor(logging.DEBUG)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        dul = cast(EventDrivenDUL, self.assoc.dul)  # EventDrivenAssociation makes the two together
        if dul.state_machine.current_state != "Sta6" or dul.socket is None:
            super().send_msg(primitive, context_id)
            return
        if isinstance(primitive, C_STORE) and not self._sent_is_watched():
            stored = getattr(primitive, "_dataset_path", None)  # a request sending a file as stored
            if primitive.MessageIDBeingRespondedTo is None:
                command = encode_c_store_rq(primitive) if stored else None
            else:
                command = encode_c_store_rsp(primitive)
            if command is not None and (not self.maximum_pdu_size or len(command) + 6 <= self.maximum_pdu_size):
                pdus: Iterable[bytes] = [command_p_data_tf(context_id, command)]
                if stored and primitive.MessageIDBeingRespondedTo is None:
                    pdus = itertools.chain(pdus, file_data_set_p_data_tfs(context_id, stored[0], stored[1],
                                                                          self.maximum_pdu_size))
                with dul.send_lock:
                    for block in joined(pdus, SEND_BLOCK_BYTES):
                        dul.socket.send(block)
                return
        if primitive.MessageIDBeingRespondedTo is None:
            message = _RQ_TO_MESSAGE[primitive.__class__]()
        else:
            message = _RSP_TO_MESSAGE[primitive.__class__]()
        message.primitive_to_message(primitive)
        message.context_id = context_id
        evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": message})
        with dul.send_lock:
            for pdata in message.encode_msg(context_id, self.maximum_pdu_size):
                dul.socket.send(encode_p_data(pdata))


class EventDrivenAssociation(Association):
    """Acceptor association whose reactor wakes when a DIMSE message or a release/abort request arrives."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self._wake = threading.Event()
        self.dul = EventDrivenDUL(self, self._wake.set)
        self.dimse = DirectSendDIMSE(self)
        self.dimse.msg_queue = WakingQueue(self._wake.set)
        #: An acceptor's place among its host's not-yet-associated connections (see :class:`ConnectionGate`).
        self.pending: PendingConnection | None = None

    def kill(self) -> None:
        self._wake.set()
        super().kill()

    def _settle(self) -> None:
        if self.pending is not None:
            self.pending.settle()

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            self._settle()  # rejected, aborted, timed out or ended: the host's place is free again

    def _run_reactor(self) -> None:
        """pynetdicom 3.0's ``Association._run_reactor`` with the 1 ms sleep replaced by a wait."""
        if self.pending is not None:  # established
            self._settle()
            self.acse_timeout = self.ae.acse_timeout
            # A PDU that stops half way ends the association after the network timeout, not never.
            assoc_socket = self.dul.socket
            sock = assoc_socket.socket if assoc_socket is not None else None
            timeout = self.ae.network_timeout
            if sock is not None and timeout is not None:
                try:
                    set_io_timeout(sock, timeout)
                except OSError:
                    pass
        self._is_paused = False
        while not self._kill:
            # Waiting counts as paused (it touches neither DIMSE nor ACSE), so a requestor's send_c_store(), which
            # clears the checkpoint and then waits for ``_is_paused``, goes ahead at once instead of after the wait.
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._wake.wait(MAX_WAIT_SECONDS)
            self._wake.clear()  # anything put from now on sets it again; the checks below see what came before
            self._reactor_checkpoint.wait()
            self._is_paused = False
            if not self._reactor_checkpoint.is_set():
                # A requestor cleared the checkpoint after the wait above and may have read ``_is_paused`` as
                # True before the line above: it is now waiting on the DIMSE queue for its response, so this loop
                # must not take it. (pynetdicom's own loop has the same window; with two associations sending
                # on two cores it was hit: "Received unexpected C-STORE service message", then a DIMSE timeout.)
                continue

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._wake.set()  # more messages may be queued behind this one
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                LOGGER.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def copy_contexts(contexts: list[PresentationContext]) -> list[PresentationContext]:
    """Copy the supported contexts for one association.

    pynetdicom deep-copies them (about 150 storage SOP classes x 16 transfer syntaxes: 50 ms of CPU per
    association). Negotiation only sets attributes on a context and never changes its transfer syntax list in
    place, so a shallow copy of each context with its own list is enough.
    """
    copies = []
    for context in contexts:
        duplicate = copy(context)
        duplicate._transfer_syntax = list(context._transfer_syntax)
        copies.append(duplicate)
    return copies


class EventDrivenRequestHandler(RequestHandler):
    """pynetdicom's request handler, building :class:`EventDrivenAssociation` objects."""

    def _create_association(self) -> Association:
        assoc = EventDrivenAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        sock = AssociationSocket(assoc, client_socket=self.request)
        assoc.set_socket(sock)
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = copy_contexts(self.server.contexts)
        assoc.requestor.address_info = self.remote
        handed_over = self.server.take_pending() if isinstance(self.server, EventDrivenServer) else None
        if handed_over is not None:
            assoc.pending, deadline = handed_over
            # The rest of the A-ASSOCIATE-RQ gets what is left of the request timeout (at least a second),
            # instead of pynetdicom's 30 s ACSE timeout; the AE's own comes back once it is established.
            assoc.acse_timeout = max(deadline - time.monotonic(), 1.0)
        for event in self.server._handlers:
            if event.is_intervention and self.server._handlers[event]:
                assoc.bind(event, *self.server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in self.server._handlers[event]:
                    handler = cast(evt._HandlerBase, handler)
                    assoc.bind(event, handler[0], handler[1])
        return assoc


class PendingConnection:
    """A connection that holds one of its host's places among the not-yet-associated connections.

    The place is given back once, by :meth:`settle`: when the association is established, or when the
    connection ends without one (rejected, timed out, closed, failed).
    """

    def __init__(self, gate: ConnectionGate, host: str) -> None:
        self.gate = gate
        self.host = host
        self._settled = False

    def settle(self) -> None:
        """Give the host's place back (idempotent)."""
        self.gate._settle(self)


class ConnectionGate:
    """Who may hold a TCP connection to the SCP before it has associated.

    pynetdicom starts an association thread for every accepted connection, waits 30 s (its ACSE timeout) for its
    A-ASSOCIATE-RQ, and counts the waiting connections against ``maximum_associations``; the host allow-list
    was checked only once the request had arrived. Sixteen connections that never sent a byte, from any host,
    refused every sender for 30 s. The gate, consulted by :class:`EventDrivenServer` at accept:

    - closes connections from hosts outside ``networks`` (when it is not empty) at once;
    - closes connections from a host that already has ``max_pending_per_host`` not yet associated;
    - gives each admitted connection ``request_timeout`` seconds for its TLS handshake and its A-ASSOCIATE-RQ.

    Refusals are logged at WARNING, at most once a minute per host and reason, with the number left unlogged,
    and each is passed to ``on_close`` (the service counts them for ``/metrics``) with its kind
    (:data:`CLOSE_KINDS`).

    Parameters
    ----------
    networks : list of IPv4Network or IPv6Network
        ``security.allowed_hosts``; empty: any host.
    max_pending_per_host : int
        ``security.max_pending_per_host``.
    request_timeout : float
        ``node.association_request_timeout``.
    """

    #: Seconds between two log lines about the same host and reason.
    REPORT_INTERVAL = 60.0

    def __init__(self, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network], max_pending_per_host: int,
                 request_timeout: float) -> None:
        self.networks = list(networks)
        self.max_pending_per_host = max_pending_per_host
        self.request_timeout = request_timeout
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}
        #: (host, reason) -> (monotonic time of the last line, refusals since then)
        self._reports: dict[tuple[str, str], tuple[float, int]] = {}
        #: Called with the kind of every connection closed before associating (set by the service).
        self.on_close: Callable[[str], None] = lambda _kind: None

    def is_allowed(self, host: str) -> bool:
        """Whether ``host`` (an IP address as text) is in the allow-list; any host when it is empty."""
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.networks)

    def admit(self, host: str, port: int) -> PendingConnection | None:
        """Take a place for a connection just accepted from ``host``; ``None``: close it now."""
        if not self.is_allowed(host):
            self.report(host, port, "host not in security.allowed_hosts", kind="host_not_allowed")
            return None
        with self._lock:
            pending = self._pending.get(host, 0)
            if pending < self.max_pending_per_host:
                self._pending[host] = pending + 1
                return PendingConnection(self, host)
        self.report(host, port, f"{pending} connection(s) from this host not associated yet "
                                f"(security.max_pending_per_host)", kind="too_many_pending")
        return None

    def pending(self, host: str) -> int:
        """How many connections from ``host`` are not associated yet."""
        with self._lock:
            return self._pending.get(host, 0)

    def _settle(self, connection: PendingConnection) -> None:
        with self._lock:
            if connection._settled:
                return
            connection._settled = True
            left = self._pending.get(connection.host, 0) - 1
            if left > 0:
                self._pending[connection.host] = left
            else:
                self._pending.pop(connection.host, None)

    def report(self, host: str, port: int, reason: str, level: int = logging.WARNING, *, kind: str) -> None:
        """Log that a connection from ``host`` was closed before associating, throttled per host and reason,
        and count it under ``kind`` (one of :data:`CLOSE_KINDS`)."""
        self.on_close(kind)
        now = time.monotonic()
        key = (host, reason)
        with self._lock:
            last, unlogged = self._reports.get(key, (-self.REPORT_INTERVAL, 0))
            if now - last < self.REPORT_INTERVAL:
                self._reports[key] = (last, unlogged + 1)
                return
            self._reports[key] = (now, 0)
            if len(self._reports) > 10000:  # forget hosts not heard from for a while
                self._reports = {k: v for k, v in self._reports.items() if now - v[0] < self.REPORT_INTERVAL}
        more = f" ({unlogged} more since the last report)" if unlogged else ""
        LOGGER.log(level, "closed connection from %s:%d before association: %s%s", host, port, reason, more)


def set_io_timeout(sock: socket.socket, seconds: float) -> None:
    """Bound each blocking ``recv`` and ``send`` on ``sock`` to ``seconds`` (``SO_RCVTIMEO``, ``SO_SNDTIMEO``).

    The kernel's timeouts, not Python's ``settimeout``: that one makes every ``recv`` poll first, and pynetdicom
    reads a PDU 4 KiB at a time (measured: twice the time to read a 512 KiB slice). A read that times out raises
    ``BlockingIOError`` (``SSLWantReadError`` over TLS), an ``OSError`` pynetdicom takes for a closed connection.
    """
    seconds = max(float(seconds), 0.001)
    timeval = struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


#: Most bytes of a first PDU looked at (``MSG_PEEK``) before a connection becomes an association; an A-ASSOCIATE-RQ
#: is usually under 10 KiB, and the kernel's receive buffer (128 KiB by default on Linux) holds this much.
MAX_REQUEST_PEEK = 65536


#: Why a connection was closed before it associated (the ``reason`` label of ``dicom_node_connections_closed``).
CLOSE_KINDS = ("host_not_allowed", "too_many_pending", "request_timeout", "closed_by_peer", "tls_failed")

#: What :func:`wait_for_request` saw.
REQUEST, CLOSED, TIMED_OUT = "request", "closed", "timed out"


def wait_for_request(sock: socket.socket, deadline: float, stopping: threading.Event) -> str:
    """Wait until the peer's first PDU (the A-ASSOCIATE-RQ) has arrived, before ``deadline`` (monotonic).

    On plain TCP the whole PDU (or its first ``MAX_REQUEST_PEEK`` bytes) must be in the socket's buffer, looked
    at without reading it; over TLS, whose records cannot be peeked at, its first byte.

    Returns
    -------
    str
        ``REQUEST`` (also when the socket failed: pynetdicom then sees that itself), ``CLOSED`` when the peer
        closed without sending anything (a port probe), ``TIMED_OUT`` when the deadline passed or the server is
        stopping.
    """
    tls = isinstance(sock, ssl.SSLSocket)
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return REQUEST
    while not stopping.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return TIMED_OUT
        readable, _, _ = select.select([sock], [], [], min(left, 0.5))
        if not readable:
            continue
        if tls:
            return REQUEST
        try:
            head = sock.recv(MAX_REQUEST_PEEK, socket.MSG_PEEK)
        except OSError:
            return REQUEST
        if not head:
            return CLOSED
        if len(head) >= 6 and len(head) >= min(6 + struct.unpack_from(">I", head, 2)[0], MAX_REQUEST_PEEK):
            return REQUEST
        stopping.wait(0.01)  # part of the request is here (the socket stays readable): look again shortly
    return TIMED_OUT


class EventDrivenServer(ThreadedAssociationServer):
    """Threaded association server using :class:`EventDrivenRequestHandler`, admitting connections through a
    :class:`ConnectionGate`.

    pynetdicom's server wraps each accepted socket in TLS in its accept loop, where a client that never starts
    the handshake stopped every other connection, and starts an association (which counts against
    ``maximum_associations``) before anything was received. Here the accept loop only asks the gate
    (``verify_request``); the connection's own thread then does the TLS handshake and waits for the
    A-ASSOCIATE-RQ (:func:`wait_for_request`), both within the gate's ``request_timeout``, and only then creates
    the association, whose ACSE timeout (the wait for the rest of the request, over TLS) is what is left of it.
    """

    #: Connection threads must not hold up shutdown; a waiting one notices ``_stopping`` within 0.5 s.
    daemon_threads = True

    def __init__(self, *args: Any, gate: ConnectionGate | None = None, **kwargs: Any) -> None:
        kwargs["request_handler"] = EventDrivenRequestHandler
        self.gate = gate or ConnectionGate([], 1 << 30, 30.0)
        self._stopping = threading.Event()
        self._admitted: dict[int, tuple[PendingConnection, float]] = {}
        #: The place and deadline of the connection a thread is turning into an association (see
        #: :meth:`take_pending`): ``finish_request`` builds the request handler with no room to pass them.
        self._handing_over = threading.local()
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; its TLS handshake is left to its own thread (:meth:`process_request_thread`)."""
        client, address = cast(socket.socket, self.socket).accept()
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Ask the gate; a connection it refuses is closed by ``socketserver`` before any thread is started."""
        admitted = self.gate.admit(str(client_address[0]), int(client_address[1]))
        if admitted is None:
            return False
        self._admitted[id(request)] = (admitted, time.monotonic() + self.gate.request_timeout)
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:
            admitted = self._admitted.pop(id(request), None)
            if admitted is not None:
                admitted[0].settle()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """The TLS handshake and the A-ASSOCIATE-RQ within the request timeout, then the association."""
        pending, deadline = self._admitted.pop(id(request))
        host, port = str(client_address[0]), int(client_address[1])
        sock = request
        try:
            if self.ssl_context is not None:
                request.settimeout(max(deadline - time.monotonic(), 0.001))
                try:
                    sock = self.ssl_context.wrap_socket(request, server_side=True)
                except (OSError, ValueError) as exc:  # ssl.SSLError and socket.timeout are OSErrors
                    if isinstance(exc, TimeoutError):
                        self.gate.report(host, port, "no TLS handshake within node.association_request_timeout",
                                         logging.INFO, kind="request_timeout")
                    elif isinstance(exc, (ssl.SSLEOFError, ConnectionError)):  # a port probe: connect, close
                        self.gate.report(host, port, "closed before its TLS handshake", logging.DEBUG,
                                         kind="closed_by_peer")
                    else:  # a certificate or protocol problem, worth an administrator's look
                        self.gate.report(host, port, f"TLS handshake failed: {exc}", kind="tls_failed")
                    pending.settle()
                    self.shutdown_request(request)
                    return
                sock.settimeout(None)  # blocking, as pynetdicom's own accept leaves it
            seen = wait_for_request(sock, deadline, self._stopping)
            if seen != REQUEST:
                if seen == TIMED_OUT and not self._stopping.is_set():
                    self.gate.report(host, port, "no A-ASSOCIATE-RQ within node.association_request_timeout",
                                     logging.INFO, kind="request_timeout")
                elif seen == CLOSED:
                    self.gate.report(host, port, "closed before its A-ASSOCIATE-RQ", logging.DEBUG,
                                     kind="closed_by_peer")
                pending.settle()
                self.shutdown_request(sock)
                return
            # pynetdicom reads a PDU with blocking ``recv`` calls until it is whole: a peer that sent part of a
            # PDU and then nothing held the DUL thread, and so an association slot, for ever. With a timeout the
            # read fails and pynetdicom closes the connection; once associated, the association uses the network
            # timeout instead (EventDrivenAssociation).
            set_io_timeout(sock, max(deadline - time.monotonic(), 1.0))
            self._handing_over.pending = (pending, deadline)
            try:
                self.finish_request(sock, client_address)
            finally:
                self._handing_over.pending = None
        except Exception:
            pending.settle()
            self.handle_error(sock, client_address)
            self.shutdown_request(sock)

    def take_pending(self) -> tuple[PendingConnection, float] | None:
        """The place and deadline of the connection this thread is turning into an association."""
        return getattr(self._handing_over, "pending", None)

    def shutdown(self) -> None:
        self._stopping.set()
        super().shutdown()


class AllowListServer(ThreadedAssociationServer):
    """pynetdicom's own threaded server (the stock path, ``node.dimse_fast_path = false``) that checks only the
    gate's host allow-list at accept.

    Only ``socketserver``'s ``verify_request`` hook is overridden: pynetdicom's accept loop, TLS handshake (in
    the accept loop), association threads and ACSE timeout are unchanged, so the gate's per-host cap on
    connections not yet associated and its request timeout do not apply on this path.
    """

    def __init__(self, *args: Any, gate: ConnectionGate | None = None, **kwargs: Any) -> None:
        self.gate = gate or ConnectionGate([], 1 << 30, 30.0)
        super().__init__(*args, **kwargs)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Close connections from hosts outside ``security.allowed_hosts`` before any thread is started."""
        host, port = str(client_address[0]), int(client_address[1])
        if self.gate.is_allowed(host):
            return True
        self.gate.report(host, port, "host not in security.allowed_hosts", kind="host_not_allowed")
        return False


def use_event_driven_requestors() -> None:
    """Make pynetdicom's ``AE.associate`` build :class:`EventDrivenAssociation` objects (idempotent).

    As a requestor, ``send_c_store`` pauses the reactor and waits for the response on the DIMSE queue itself;
    the polling DUL still added up to 1 ms on each side of every C-STORE. ``AE.associate`` has no hook for the
    association class, so the name it uses is replaced for the whole process. Called only by ``Node.start``
    when ``node.dimse_fast_path`` is on, before any stage runs, so every association the process opens (exports,
    the dashboard's C-ECHO) is of the same kind from the start; one-shot commands keep stock pynetdicom.
    """
    if pynetdicom.ae.Association is not EventDrivenAssociation:
        pynetdicom.ae.Association = EventDrivenAssociation  # type: ignore[misc]
