"""Valid DICOM upper-layer traffic as bytes, and a raw client that plays it PDU by PDU (for tools/fuzz_pacs.py).

The PDUs are built here from PS3.8 section 9.3 (A-ASSOCIATE-RQ, P-DATA-TF, A-RELEASE-RQ) and the command sets from
PS3.7 (C-ECHO-RQ, C-STORE-RQ, implicit VR little endian), not by pynetdicom, so that every byte can be mutated
(tools/fuzz_mutators.py). Datasets are encoded by pydicom, one top-level element at a time, so that a mutator can
change one element. ``tests/test_dicom_node_fuzz.py`` checks that a session built here is understood by pynetdicom
(a peer implementation): the C-STORE is stored with status 0x0000.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, replace

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
UNKNOWN_SOP_CLASS = "1.2.826.0.1.3680043.8.498.999.1"  # a UID under pydicom's root that names no SOP class
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.8.498.999.2"
MAX_PDU = 16382  # the node's limits.max_pdu_size default; P-DATA-TF PDUs are cut to fit it

# PDU types (PS3.8 table 9-11) and the presentation contexts every session proposes
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = range(1, 8)
CT_EXPLICIT, CT_IMPLICIT, ECHO_CONTEXT, UNKNOWN_CONTEXT = 1, 3, 5, 7
CONTEXTS = (
    (CT_EXPLICIT, CT_IMAGE_STORAGE, (EXPLICIT_LE,)),
    (CT_IMPLICIT, CT_IMAGE_STORAGE, (IMPLICIT_LE,)),
    (ECHO_CONTEXT, VERIFICATION, (IMPLICIT_LE,)),
    (UNKNOWN_CONTEXT, UNKNOWN_SOP_CLASS, (IMPLICIT_LE,)),  # refused by the node: abstract syntax not supported
)


@dataclass(frozen=True)
class Step:
    """One PDU sent by the client; ``reply``: then wait for one PDU from the node."""

    pdu: bytes
    reply: bool = False
    label: str = ""


def pdu(pdu_type: int, payload: bytes) -> bytes:
    """A PDU: type, reserved, 4-byte big-endian length, payload."""
    return struct.pack(">BBL", pdu_type, 0, len(payload)) + payload


def item(item_type: int, payload: bytes) -> bytes:
    """A variable item of an A-ASSOCIATE PDU: type, reserved, 2-byte big-endian length, payload."""
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def associate_rq(called: str, calling: str, contexts=CONTEXTS, max_pdu: int = MAX_PDU) -> bytes:
    """A-ASSOCIATE-RQ proposing ``contexts`` (``(id, abstract syntax, transfer syntaxes)``)."""
    items = item(0x10, APPLICATION_CONTEXT.encode())
    for context_id, abstract, transfers in contexts:
        sub = item(0x30, abstract.encode()) + b"".join(item(0x40, ts.encode()) for ts in transfers)
        items += item(0x20, struct.pack(">B3x", context_id) + sub)
    items += item(0x50, item(0x51, struct.pack(">L", max_pdu)) + item(0x52, IMPLEMENTATION_UID.encode()))
    header = struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)
    return pdu(ASSOCIATE_RQ, header + items)


def p_data(context_id: int, is_command: bool, is_last: bool, fragment: bytes) -> bytes:
    """P-DATA-TF with one PDV: 4-byte item length, context ID, message control header, fragment."""
    control = int(is_command) | (int(is_last) << 1)
    return pdu(P_DATA, struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment)


RELEASE = pdu(RELEASE_RQ, bytes(4))


def element(group: int, number: int, value: bytes) -> bytes:
    """One implicit VR little-endian element (padded to even length with NUL, as UIDs are)."""
    value += b"\0" * (len(value) % 2)
    return struct.pack("<HHL", group, number, len(value)) + value


def command_set(fields: list[tuple[int, bytes]]) -> bytes:
    """A command set (group 0000, ascending ``(element, value)``) led by its CommandGroupLength."""
    body = b"".join(element(0, number, value) for number, value in fields)
    return element(0, 0, struct.pack("<L", len(body))) + body


def c_echo_rq(message_id: int = 1) -> bytes:
    us = struct.Struct("<H").pack
    return command_set([(0x0002, VERIFICATION.encode()), (0x0100, us(0x0030)), (0x0110, us(message_id)),
                        (0x0800, us(0x0101))])  # fmt: skip


def c_store_rq(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    us = struct.Struct("<H").pack
    return command_set([(0x0002, sop_class.encode()), (0x0100, us(0x0001)), (0x0110, us(message_id)),
                        (0x0700, us(0)), (0x0800, us(0x0000)), (0x1000, sop_instance.encode())])  # fmt: skip


def encode_elements(ds: Dataset, explicit: bool, little_endian: bool = True) -> list[tuple[int, bytes]]:
    """``(tag, bytes)`` of each top-level element of ``ds`` (file meta left out), in tag order."""
    out = []
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = little_endian, not explicit
        write_data_element(fp, elem)
        out.append((int(elem.tag), fp.getvalue()))
    return out


def encode(ds: Dataset, explicit: bool) -> bytes:
    """``ds`` (file meta left out) encoded little endian, implicit or explicit VR."""
    return b"".join(data for _, data in encode_elements(ds, explicit))


def data_fragments(context_id: int, data: bytes, max_pdu: int = MAX_PDU) -> list[Step]:
    """The dataset as P-DATA-TF PDUs of at most ``max_pdu`` bytes (after the header); a reply awaited after the last."""
    size = max_pdu - 6  # the PDV item length and header
    chunks = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
    last = len(chunks) - 1
    steps = [Step(p_data(context_id, False, i == last, c), label="dataset") for i, c in enumerate(chunks)]
    steps[-1] = replace(steps[-1], reply=True)
    return steps


def store_session(called: str, calling: str, ds: Dataset, explicit: bool = True, data: bytes | None = None,
                  command: bytes | None = None, context_id: int | None = None) -> list[Step]:  # fmt: skip
    """A-ASSOCIATE-RQ, C-STORE-RQ of ``ds`` (or of ``data``, its encoded bytes), A-RELEASE-RQ."""
    context_id = context_id or (CT_EXPLICIT if explicit else CT_IMPLICIT)
    if data is None:
        data = encode(ds, explicit)
    if command is None:
        command = c_store_rq(str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    return [
        Step(associate_rq(called, calling), reply=True, label="associate"),
        Step(p_data(context_id, True, True, command), label="command"),
        *data_fragments(context_id, data),
        Step(RELEASE, reply=True, label="release"),
    ]


def echo_session(called: str, calling: str) -> list[Step]:
    return [
        Step(associate_rq(called, calling), reply=True, label="associate"),
        Step(p_data(ECHO_CONTEXT, True, True, c_echo_rq()), reply=True, label="command"),
        Step(RELEASE, reply=True, label="release"),
    ]


def with_pdu(steps: list[Step], index: int, new_pdu: bytes, stop: bool = True) -> list[Step]:
    """``steps`` with step ``index``'s PDU replaced; ``stop``: the session ends there (the client half-closes at once
    and reads what the node sends)."""
    if stop:
        return [*steps[:index], replace(steps[index], pdu=new_pdu, reply=False)]
    return [*steps[:index], replace(steps[index], pdu=new_pdu), *steps[index + 1 :]]


# ------------------------------------------------------------------------------------------------ the client


@dataclass
class Outcome:
    """How one session went: ``replies`` (PDU types received), ``statuses`` (C-STORE/C-ECHO statuses), ``end``, and
    the client's port (to find the connection in the node's log)."""

    replies: list[int]
    statuses: list[int]
    end: str  # "released", "rejected", "aborted", "closed" (by the node), "no_reply", "refused" (no connection)
    port: int = 0


def read_pdu(sock: socket.socket, timeout: float) -> bytes | None:
    """One PDU from the node, or None on a timeout or a close; reads at most the 6 header bytes plus 1 MiB."""
    sock.settimeout(timeout)
    header = _read_exactly(sock, 6)
    if header is None:
        return None
    _, _, length = struct.unpack(">BBL", header)
    body = _read_exactly(sock, min(length, 1 << 20))
    return None if body is None else header + body


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except (TimeoutError, OSError):
            return None
        if not chunk:
            return None
        data += chunk
    return data


def dimse_status(reply: bytes) -> int | None:
    """The Status (0000,0900) of a command set in a P-DATA-TF reply, or None."""
    if len(reply) < 12 or reply[0] != P_DATA or not reply[11] & 1:  # the first PDV must carry a command
        return None
    data, offset = reply[12:], 0
    while offset + 8 <= len(data):
        group, number, length = struct.unpack_from("<HHL", data, offset)
        if (group, number) == (0, 0x0900) and length == 2:
            return struct.unpack_from("<H", data, offset + 8)[0]
        offset += 8 + length
    return None


def play(address: tuple[str, int], steps: list[Step], source: str, timeout: float = 5.0,
         close_wait: float = 5.0) -> tuple[Outcome, bool]:  # fmt: skip
    """Send ``steps`` from ``source``, waiting up to ``timeout`` for a reply after each step that asks for one; after
    the last step (or a reply that ends the session) half-close, then read what the node still sends until it closes
    the connection, for at most ``close_wait`` seconds.

    Returns the outcome and whether the node closed the connection (False: still open after ``close_wait``).
    """
    try:
        sock = socket.create_connection(address, timeout=timeout, source_address=(source, 0))
    except OSError:
        return Outcome([], [], "refused"), True
    outcome = Outcome([], [], "no_reply", sock.getsockname()[1])
    with sock:
        for step in steps:
            try:
                sock.sendall(step.pdu)
            except OSError:
                outcome.end = "closed"
                return outcome, True
            if step.reply and not _take_reply(sock, outcome, timeout):
                break
        data, closed = _drain(sock, close_wait)
        for reply in split_pdus(data):
            _note(outcome, reply)
        if closed and outcome.end in ("no_reply", "open"):
            outcome.end = "closed"
        return outcome, closed


def split_pdus(data: bytes) -> list[bytes]:
    """The PDUs of a byte stream (a last incomplete one included as it is)."""
    out, offset = [], 0
    while offset + 6 <= len(data):
        length = struct.unpack_from(">L", data, offset + 2)[0]
        out.append(data[offset : offset + 6 + length])
        offset += 6 + length
    return out


def _note(outcome: Outcome, reply: bytes) -> bool:
    """Record one reply; False when it ends the session (rejected, aborted, released)."""
    outcome.replies.append(reply[0])
    if (status := dimse_status(reply)) is not None:
        outcome.statuses.append(status)
    ends = {ASSOCIATE_RJ: "rejected", ABORT: "aborted", RELEASE_RP: "released"}
    outcome.end = ends.get(reply[0], "open")
    return reply[0] not in ends


def _take_reply(sock: socket.socket, outcome: Outcome, timeout: float) -> bool:
    """Read one reply into ``outcome``; False when the session is over (no reply, rejected, aborted, released)."""
    reply = read_pdu(sock, timeout)
    if reply is None:
        outcome.end = "no_reply"
        return False
    return _note(outcome, reply)


def _drain(sock: socket.socket, seconds: float) -> tuple[bytes, bool]:
    """Shut our sending side (the node reads end-of-stream), then read until the node closes (True) or ``seconds``
    pass (False); at most 4 MiB are kept."""
    data = b""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return data, True
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, socket.timeout):
            return data, False
        except OSError:
            return data, True
        if not chunk:
            return data, True
        data = (data + chunk)[: 4 << 20]
    return data, False
