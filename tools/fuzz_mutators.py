"""Mutations of valid DICOM traffic for the node's fuzz harness (tools/fuzz_pacs.py).

Each mutator takes a random generator and a :class:`Template` (a valid CT slice with fresh UIDs, and the AE titles)
and returns ``(variant, steps)``: a short description and the PDUs to send (tools/fuzz_pdus.py). PDU-level mutators
change one PDU of a valid session (C-STORE or C-ECHO) and end the session there; dataset-level mutators send a
well-framed C-STORE whose command set or dataset lies. ``MUTATIONS`` lists them by the name counted in the JSON.
"""

from __future__ import annotations

import copy
import random
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from fuzz_pdus import (
    ABORT,
    APPLICATION_CONTEXT,
    ASSOCIATE_AC,
    ASSOCIATE_RQ,
    CT_EXPLICIT,
    CT_IMAGE_STORAGE,
    CT_IMPLICIT,
    EXPLICIT_LE,
    IMPLEMENTATION_UID,
    MAX_PDU,
    P_DATA,
    RELEASE_RP,
    RELEASE_RQ,
    UNKNOWN_CONTEXT,
    UNKNOWN_SOP_CLASS,
    Step,
    c_store_rq,
    command_set,
    echo_session,
    encode,
    encode_elements,
    item,
    pdu,
    store_session,
    with_pdu,
)
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

PDU_TYPES = (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07)
PIXEL_DATA, REFERENCED_IMAGE_SEQUENCE = 0x7FE00010, 0x00081140
ITEM, ITEM_END, SEQUENCE_END = 0xE000, 0xE00D, 0xE0DD
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


@dataclass
class Template:
    """A valid CT slice (fresh study, series and SOP instance UIDs) and the AE titles of the session."""

    ds: Dataset
    called: str
    calling: str

    @classmethod
    def fresh(cls, base: Dataset, called: str, calling: str, rng: random.Random) -> Template:
        """A copy of ``base`` with study, series and SOP instance UIDs drawn from ``rng`` (the file meta is never
        sent, so it is left as it is)."""
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (random_uid(rng) for _ in range(3))
        return cls(ds, called, calling)

    @property
    def series_uid(self) -> str:
        return str(self.ds.SeriesInstanceUID)

    def session(self, rng: random.Random, **kwargs) -> list[Step]:
        """A valid C-STORE session of the slice (explicit or implicit VR, drawn) with ``store_session`` options."""
        kwargs.setdefault("explicit", rng.random() < 0.5)
        return store_session(self.called, self.calling, self.ds, **kwargs)


Mutator = Callable[[random.Random, Template], tuple[str, list[Step]]]


def random_uid(rng: random.Random) -> str:
    """A UID under pydicom's root, the same for the same state of ``rng``."""
    return generate_uid(entropy_srcs=[str(rng.getrandbits(128))])


def _any_session(rng: random.Random, t: Template) -> tuple[str, list[Step]]:
    if rng.random() < 0.25:
        return "echo", echo_session(t.called, t.calling)
    return "store", t.session(rng)


def _pick_step(rng: random.Random, steps: list[Step]) -> int:
    return rng.randrange(len(steps))


def _set_length(data: bytes, length: int) -> bytes:
    """The PDU with its 4-byte length field set to ``length`` (the bytes that follow unchanged)."""
    return data[:2] + struct.pack(">L", length) + data[6:]


# ------------------------------------------------------------------------------------------------ PDU level


def pdu_truncate(rng: random.Random, t: Template) -> tuple[str, list[Step]]:
    """One PDU cut short (its length field kept), then end of stream."""
    kind, steps = _any_session(rng, t)
    i = _pick_step(rng, steps)
    data = steps[i].pdu
    cut = rng.randrange(1, len(data))
    return f"{kind} {steps[i].label} PDU cut to {cut} of {len(data)} bytes", with_pdu(steps, i, data[:cut])


def pdu_extend(rng: random.Random, t: Template) -> tuple[str, list[Step]]:
    """Bytes after one PDU: junk, zeros or the PDU again; its length field kept or grown to cover them."""
    kind, steps = _any_session(rng, t)
    i = _pick_step(rng, steps)
    original = steps[i].pdu
    extra = rng.choice([rng.randbytes(rng.randrange(1, 2048)), bytes(rng.randrange(1, 64)), original])
    data = original + extra
    covered = rng.random() < 0.5
    if covered:
        data = _set_length(data, len(data) - 6)
    how = "inside (length grown)" if covered else "after (length kept)"
    return f"{kind} {steps[i].label} PDU + {len(extra)} bytes {how}", with_pdu(steps, i, data, stop=not covered)


def pdu_length_flip(rng: random.Random, t: Template) -> tuple[str, list[Step]]:
    """One PDU's length field changed to a wrong but plausible value."""
    kind, steps = _any_session(rng, t)
    i = _pick_step(rng, steps)
    real = len(steps[i].pdu) - 6
    wrong = rng.choice([0, 1, 3, real - 1, real + 1, real * 2, rng.randrange(0, 1 << 16)])
    wrong = wrong if wrong != real else real + 2
    return f"{kind} {steps[i].label} PDU length {real} -> {wrong}", with_pdu(steps, i, _set_length(steps[i].pdu, wrong))


def pdu_type_flip(rng: random.Random, t: Template) -> tuple[str, list[Step]]:
    """One PDU's type changed: to a type that does not exist, or to a real one out of place."""
    kind, steps = _any_session(rng, t)
    i = _pick_step(rng, steps)
    original = steps[i].pdu[0]
    new = rng.choice([0x00, 0x08, 0x09, 0x10, 0x20, 0x7F, 0x80, 0xFF, *[p for p in PDU_TYPES if p != original]])
    data = bytes([new]) + steps[i].pdu[1:]
    return f"{kind} {steps[i].label} PDU type 0x{original:02X} -> 0x{new:02X}", with_pdu(steps, i, data)


def pdu_length_oversized(rng: random.Random, t: Template) -> tuple[str, list[Step]]:
    """One PDU declares far more bytes than any PDU may hold, then some bytes (up to 256 KiB) follow."""
    kind, steps = _any_session(rng, t)
    i = _pick_step(rng, steps)
    length = rng.choice([MAX_PDU + 7, 1 << 20, 1 << 24, (1 << 31) - 1])
    data = _set_length(steps[i].pdu, length) + bytes(rng.choice([0, 4096, 1 << 16, 1 << 18]))
    return f"{kind} {steps[i].label} PDU declares {length} bytes, sends {len(data) - 6}", with_pdu(steps, i, data)


def pdu_length_negative(rng: random.Random, t: Template) -> tuple[str, list[Step]]:
    """One PDU's length with the sign bit set (negative as a signed 32-bit integer)."""
    kind, steps = _any_session(rng, t)
    i = _pick_step(rng, steps)
    length = rng.choice([0x80000000, 0xFFFFFFFF, 0xFFFFFFFE, 0x80000000 + len(steps[i].pdu) - 6])
    return f"{kind} {steps[i].label} PDU length 0x{length:08X}", with_pdu(steps, i, _set_length(steps[i].pdu, length))


def _rq_items(rq: bytes) -> list[int]:
    """Offsets of every variable item and sub-item of an A-ASSOCIATE-RQ (presentation contexts, user information)."""
    offsets, todo = [], [(74, len(rq))]
    while todo:
        start, end = todo.pop()
        offset = start
        while offset + 4 <= end:
            kind, length = rq[offset], struct.unpack_from(">H", rq, offset + 2)[0]
            offsets.append(offset)
            if kind in (0x20, 0x50):  # sub-items after the context ID block, or directly
                todo.append((offset + (8 if kind == 0x20 else 4), offset + 4 + length))
            offset += 4 + length
    return sorted(offsets)


def associate_items(rng: random.Random, t: Template) -> tuple[str, list[Step]]:
    """One item or sub-item of the A-ASSOCIATE-RQ with a wrong length (0, 0xFFFF, 0x8000, off by one) or type."""
    _, steps = _any_session(rng, t)
    rq = bytearray(steps[0].pdu)
    offset = rng.choice(_rq_items(bytes(rq)))
    if rng.random() < 0.3:
        types = [0x00, 0x10, 0x20, 0x21, 0x30, 0x40, 0x50, 0x51, 0x52, 0x55, 0x59, 0xFF]
        new_type = rng.choice([t for t in types if t != rq[offset]])
        variant = f"item at {offset}: type 0x{rq[offset]:02X} -> 0x{new_type:02X}"
        rq[offset] = new_type
    else:
        real = struct.unpack_from(">H", rq, offset + 2)[0]
        new_length = rng.choice([0, 0xFFFF, 0x8000, max(real - 1, 0), real + 1, real + 40])
        variant = f"item 0x{rq[offset]:02X} at {offset}: length {real} -> {new_length}"
        struct.pack_into(">H", rq, offset + 2, new_length)
    return variant, with_pdu(steps, 0, bytes(rq), stop=False)


def associate_fields(rng: random.Random, t: Template) -> tuple[str, list[Step]]:
    """A-ASSOCIATE-RQ fields out of range: protocol version, AE titles (blank, NUL, non-ASCII), no contexts,
    an even or repeated context ID, a zero or huge maximum PDU length, a wrong application context."""
    _, steps = _any_session(rng, t)
    rq = bytearray(steps[0].pdu)
    choice = rng.randrange(7)
    if choice == 0:
        version = rng.choice([0, 2, 0xFFFF])
        struct.pack_into(">H", rq, 6, version)
        variant = f"protocol version {version}"
    elif choice == 1:
        offset = rng.choice([10, 26])  # called, calling
        rq[offset : offset + 16] = rng.choice([b" " * 16, b"\0" * 16, "ÄÖÜ\\*?".encode().ljust(16), rng.randbytes(16)])
        variant = f"{'called' if offset == 10 else 'calling'} AE title {bytes(rq[offset : offset + 16])!r}"
    elif choice == 2:
        head = bytes(rq[6:74]) + item(0x10, APPLICATION_CONTEXT.encode())
        rq = bytearray(pdu(ASSOCIATE_RQ, head + _user_item(MAX_PDU)))
        variant = "no presentation context"
    elif choice == 3:
        context_id = rng.choice([0, 2, 1, 255])
        sub = item(0x30, CT_IMAGE_STORAGE.encode()) + item(0x40, EXPLICIT_LE.encode())
        contexts = item(0x20, struct.pack(">B3x", context_id) + sub) * 2
        rq = bytearray(pdu(ASSOCIATE_RQ, bytes(rq[6:74]) + item(0x10, APPLICATION_CONTEXT.encode()) + contexts
                            + _user_item(MAX_PDU)))  # fmt: skip
        variant = f"context ID {context_id} twice"
    elif choice == 4:
        max_pdu = rng.choice([0, 1, 6, 0xFFFFFFFF])
        rq = bytearray(_replace_maxpdu(bytes(rq), max_pdu))
        variant = f"maximum PDU length {max_pdu}"
    elif choice == 5:
        offset = rq.index(APPLICATION_CONTEXT.encode())
        rq[offset : offset + 21] = rng.choice([b"1.2.840.10008.3.1.1.2", b"9" * 21, b"\0" * 21])
        variant = f"application context {bytes(rq[offset : offset + 21])!r}"
    else:
        many = b"".join(item(0x20, struct.pack(">B3x", 2 * k + 1) + item(0x30, random_uid(rng).encode())
                             + item(0x40, EXPLICIT_LE.encode())) for k in range(128))  # fmt: skip
        rq = bytearray(pdu(ASSOCIATE_RQ, bytes(rq[6:74]) + item(0x10, APPLICATION_CONTEXT.encode()) + many
                            + _user_item(MAX_PDU)))  # fmt: skip
        variant = "128 presentation contexts of unknown SOP classes"
    return variant, with_pdu(steps, 0, bytes(rq), stop=False)


def _user_item(max_pdu: int) -> bytes:
    return item(0x50, item(0x51, struct.pack(">L", max_pdu)) + item(0x52, IMPLEMENTATION_UID.encode()))


def _replace_maxpdu(rq: bytes, max_pdu: int) -> bytes:
    offset = rq.index(b"\x51\x00\x00\x04")
    return rq[: offset + 4] + struct.pack(">L", max_pdu) + rq[offset + 8 :]


def pdv_fields(rng: random.Random, t: Template) -> tuple[str, list[Step]]:
    """A P-DATA-TF's PDV with a wrong item length, an unknown or refused context ID, or a wrong control header."""
    kind, steps = _any_session(rng, t)
    i = rng.choice([k for k, s in enumerate(steps) if s.pdu[0] == P_DATA])
    data = bytearray(steps[i].pdu)
    choice = rng.randrange(3)
    if choice == 0:
        real = struct.unpack_from(">L", data, 6)[0]
        new = rng.choice([0, 1, 2, real - 1, real + 1, real + 100, 0x80000000, 0xFFFFFFFF])
        struct.pack_into(">L", data, 6, new)
        variant = f"PDV length {real} -> {new}"
    elif choice == 1:
        new = rng.choice([c for c in (0, 2, 9, 255, UNKNOWN_CONTEXT) if c != data[10]])
        variant = f"PDV context {data[10]} -> {new}"
        data[10] = new
    else:
        new = rng.choice([c for c in (0x00, 0x01, 0x02, 0x03, 0xFC, 0xFF) if c != data[11]])
        variant = f"PDV control header 0x{data[11]:02X} -> 0x{new:02X}"
        data[11] = new
    return f"{kind} {steps[i].label}: {variant}", with_pdu(steps, i, bytes(data), stop=False)


def out_of_order(rng: random.Random, t: Template) -> tuple[str, list[Step]]:
    """A valid PDU where it may not come: P-DATA or A-RELEASE before the association, a second A-ASSOCIATE-RQ,
    an A-ASSOCIATE-AC or A-RELEASE-RP from the requestor, P-DATA after the A-RELEASE-RQ."""
    _, steps = _any_session(rng, t)
    choice = rng.randrange(5)
    if choice == 0:
        return "P-DATA first", [Step(steps[1].pdu, reply=True, label="command")]
    if choice == 1:
        return "A-RELEASE-RQ first", [Step(pdu(RELEASE_RQ, bytes(4)), reply=True)]
    if choice == 2:
        return "A-ASSOCIATE-RQ twice", [steps[0], Step(steps[0].pdu, reply=True)]
    if choice == 3:
        wrong = rng.choice([ASSOCIATE_AC, RELEASE_RP, ABORT])
        return f"PDU type {wrong} from the requestor", [steps[0], Step(pdu(wrong, bytes(4)), reply=True)]
    return "P-DATA after A-RELEASE-RQ", [steps[0], Step(steps[-1].pdu), Step(steps[1].pdu, reply=True)]


# ------------------------------------------------------------------------------------------------ dataset level


def _replace_element(elements: list[tuple[int, bytes]], tag: int, data: bytes | None) -> bytes:
    """The encoded dataset with element ``tag`` replaced by ``data`` (None: removed; inserted in order if absent)."""
    kept = [(k, v) for k, v in elements if k != tag]
    if data is not None:
        kept.append((tag, data))
    return b"".join(v for _, v in sorted(kept, key=lambda kv: kv[0]))


def _header(tag: int, vr: bytes | None, length: int) -> bytes:
    """An element header: implicit VR (``vr`` None) or explicit VR little endian."""
    group, number = tag >> 16, tag & 0xFFFF
    if vr is None:
        return struct.pack("<HHL", group, number, length)
    if vr in LONG_VRS:
        return struct.pack("<HH2sHL", group, number, vr, 0, length)
    return struct.pack("<HH2sH", group, number, vr, length & 0xFFFF)


def pixel_data_short(rng: random.Random, t: Template) -> tuple[str, list[Step]]:
    """Pixel data shorter than Rows x Columns x frames: cut, or Rows, Columns or NumberOfFrames raised."""
    ds, size = t.ds, len(t.ds.PixelData)
    choice = rng.randrange(4)
    if choice == 0:
        cut = rng.choice([2, 4, size // 2, size - 2, size])  # even: pydicom pads an odd value back to even
        ds.PixelData = ds.PixelData[: size - cut]
        variant = f"pixel data {size} -> {size - cut} bytes"
    elif choice == 1:
        ds.Rows = ds.Rows + rng.choice([1, 2, ds.Rows])
        variant = f"Rows -> {ds.Rows}"
    elif choice == 2:
        ds.Columns = ds.Columns + rng.choice([1, ds.Columns])
        variant = f"Columns -> {ds.Columns}"
    else:
        ds.NumberOfFrames = rng.choice([2, 3, 1000])
        variant = f"NumberOfFrames -> {ds.NumberOfFrames}"
    return variant, t.session(rng)


def pixel_data_long(rng: random.Random, t: Template) -> tuple[str, list[Step]]:
    """Pixel data longer than Rows x Columns x frames: bytes appended, or Rows or Columns lowered."""
    ds, size = t.ds, len(t.ds.PixelData)
    choice = rng.randrange(3)
    if choice == 0:
        extra = rng.choice([2, 4, size, 3 * size])
        ds.PixelData = ds.PixelData + rng.randbytes(extra)
        variant = f"pixel data {size} -> {size + extra} bytes"
    elif choice == 1:
        ds.Rows = ds.Rows - rng.choice([1, 2, ds.Rows // 2])
        variant = f"Rows -> {ds.Rows}"
    else:
        ds.Columns = ds.Columns - rng.choice([1, ds.Columns // 2])
        variant = f"Columns -> {ds.Columns}"
    return variant, t.session(rng)


def wrong_transfer_syntax(rng: random.Random, t: Template) -> tuple[str, list[Step]]:
    """The data set's transfer syntax is not the negotiated one: a file meta group (0002) inside the data set names
    another, or the bytes are encoded explicit VR on the implicit context (or the reverse, or big endian)."""
    choice = rng.randrange(3)
    if choice == 0:
        syntax = rng.choice(["1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1.99", "1.2.3",
                             "NOT-A-UID"])  # fmt: skip
        meta = Dataset()
        meta.FileMetaInformationVersion = b"\0\1"
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = t.ds.SOPClassUID, t.ds.SOPInstanceUID
        with warnings.catch_warnings():  # pydicom warns about "NOT-A-UID", which is the point
            warnings.simplefilter("ignore")
            meta.TransferSyntaxUID = syntax
        explicit = rng.random() < 0.5
        data = encode(meta, True) + encode(t.ds, explicit)
        return f"file meta in the data set: TransferSyntaxUID {syntax}", t.session(rng, explicit=explicit, data=data)
    if choice == 1:
        explicit = rng.random() < 0.5  # encoded one way, sent on the context of the other
        context = CT_IMPLICIT if explicit else CT_EXPLICIT
        data = encode(t.ds, explicit)
        return f"{'explicit' if explicit else 'implicit'} VR bytes on the other context", t.session(
            rng, data=data, context_id=context
        )
    data = b"".join(v for _, v in encode_elements(t.ds, True, little_endian=False))
    return "explicit VR big endian bytes on the explicit little endian context", t.session(
        rng, explicit=True, data=data
    )


def unknown_sop_class(rng: random.Random, t: Template) -> tuple[str, list[Step]]:
    """A C-STORE of an unknown SOP class: in the data set and the command, in the command only, in the data set only
    (MR or unknown), or sent on the presentation context the node refused."""
    choice = rng.randrange(4)
    sop = str(t.ds.SOPInstanceUID)
    if choice == 0:
        t.ds.SOPClassUID = UNKNOWN_SOP_CLASS
        return "unknown SOP class in data set and command", t.session(rng)
    if choice == 1:
        return "unknown SOP class in the command", t.session(rng, command=c_store_rq(UNKNOWN_SOP_CLASS, sop))
    if choice == 2:
        t.ds.SOPClassUID = rng.choice([UNKNOWN_SOP_CLASS, MR_IMAGE_STORAGE])
        return f"SOPClassUID {t.ds.SOPClassUID} in the data set only", t.session(
            rng, command=c_store_rq(CT_IMAGE_STORAGE, sop)
        )
    steps = t.session(rng, explicit=False, context_id=UNKNOWN_CONTEXT, command=c_store_rq(UNKNOWN_SOP_CLASS, sop))
    return "C-STORE on the refused context of an unknown SOP class", steps


def deep_sequence(rng: random.Random, t: Template) -> tuple[str, list[Step]]:
    """ReferencedImageSequence nested ``depth`` times (64 to 20000), undefined or defined lengths."""
    depth = rng.choice([64, 256, 1000, 5000, 20000])
    explicit, undefined = rng.random() < 0.5, rng.random() < 0.5
    nested = _nested_sequence(depth, explicit, undefined)
    data = _replace_element(encode_elements(t.ds, explicit), REFERENCED_IMAGE_SEQUENCE, nested)
    kind = "undefined" if undefined else "defined"
    return f"sequence nested {depth} deep, {kind} lengths, {len(nested)} bytes", t.session(
        rng, explicit=explicit, data=data
    )


def _nested_sequence(depth: int, explicit: bool, undefined: bool) -> bytes:
    """``depth`` ReferencedImageSequence elements, each the only content of the single item of the one above."""
    vr = b"SQ" if explicit else None
    item_header = struct.pack("<HHL", 0xFFFE, ITEM, 0xFFFFFFFF)
    seq_size, item_size = len(_header(REFERENCED_IMAGE_SEQUENCE, vr, 0)), len(item_header)
    if undefined:
        opening = _header(REFERENCED_IMAGE_SEQUENCE, vr, 0xFFFFFFFF) + item_header
        closing = struct.pack("<HHL", 0xFFFE, ITEM_END, 0) + struct.pack("<HHL", 0xFFFE, SEQUENCE_END, 0)
        return opening * depth + closing * depth
    out = bytearray()
    for level in range(depth, 0, -1):  # level k holds k sequences: k * (sequence + item header) bytes
        size = level * (seq_size + item_size)
        out += _header(REFERENCED_IMAGE_SEQUENCE, vr, size - seq_size)
        out += struct.pack("<HHL", 0xFFFE, ITEM, size - seq_size - item_size)
    return bytes(out)


WRONG_VRS = {
    0x00280010: [b"UL", b"SS", b"OB", b"SQ", b"UN", b"??", b"\0\0"],  # Rows (US)
    0x00280011: [b"UL", b"FD", b"SQ", b"UT"],  # Columns (US)
    0x00280100: [b"OB", b"SQ", b"DS", b"UL"],  # BitsAllocated (US)
    0x0020000E: [b"US", b"SQ", b"OB", b"FD"],  # SeriesInstanceUID (UI)
    0x00080018: [b"US", b"SQ", b"UN", b"AT"],  # SOPInstanceUID (UI)
    PIXEL_DATA: [b"SQ", b"UI", b"US", b"FL", b"AE"],  # PixelData (OW)
}
WRONG_SIZES = {0x00280010: [1, 3, 4, 8], 0x00280100: [0, 1, 4], 0x00280103: [1, 3]}  # implicit VR: a wrong size


def wrong_vr(rng: random.Random, t: Template) -> tuple[str, list[Step]]:
    """An element with the wrong VR (explicit VR: another VR code on the same value) or, implicit VR, a value whose
    size does not fit its VR (Rows in 1, 3, 4 or 8 bytes)."""
    elements = dict(encode_elements(t.ds, True))
    if rng.random() < 0.7:
        tag = rng.choice(sorted(WRONG_VRS))
        vr = rng.choice(WRONG_VRS[tag])
        old = elements[tag]
        old_header = 12 if old[4:6] in LONG_VRS else 8
        value = old[old_header:]
        new = _header(tag, vr, len(value)) + value
        data = _replace_element(list(elements.items()), tag, new)
        return f"({tag >> 16:04X},{tag & 0xFFFF:04X}) VR {old[4:6].decode()} -> {vr!r}", t.session(
            rng, explicit=True, data=data
        )
    tag = rng.choice(sorted(WRONG_SIZES))
    size = rng.choice(WRONG_SIZES[tag])
    new = _header(tag, None, size) + rng.randbytes(size)
    data = _replace_element(encode_elements(t.ds, False), tag, new)
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}) value of {size} bytes, implicit VR", t.session(
        rng, explicit=False, data=data
    )


def element_length(rng: random.Random, t: Template) -> tuple[str, list[Step]]:
    """One element's declared length huge, negative (sign bit), undefined on a non-sequence, odd, or off by a few
    bytes; the value bytes are unchanged, so every element after it is misread (implicit VR: 4-byte lengths)."""
    elements = encode_elements(t.ds, False)
    index = rng.randrange(len(elements))
    tag, old = elements[index]
    real = len(old) - 8
    new_length = rng.choice([0xFFFFFFF0, 0x80000000, 0xFFFFFFFF, real + 1, real - 2, real + 64, 1 << 30])
    new_length = new_length if 0 <= new_length != real else real + 2
    elements[index] = (tag, _header(tag, None, new_length) + old[8:])
    data = b"".join(v for _, v in elements)
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}) length {real} -> {new_length}", t.session(
        rng, explicit=False, data=data
    )


def dataset_truncate(rng: random.Random, t: Template) -> tuple[str, list[Step]]:
    """The data set cut at a random byte (inside a header or a value); the fragment still flagged last."""
    explicit = rng.random() < 0.5
    data = encode(t.ds, explicit)
    cut = rng.randrange(1, len(data))
    return f"data set cut to {cut} of {len(data)} bytes", t.session(rng, explicit=explicit, data=data[:cut])


def command_fields(rng: random.Random, t: Template) -> tuple[str, list[Step]]:
    """A C-STORE-RQ command set that lies: wrong group length, an unknown or wrong command, no SOP Instance UID or
    another one than the data set's, 'no data set' although one follows, explicit VR encoding, an element that runs
    past the end."""
    sop, us = str(t.ds.SOPInstanceUID), struct.Struct("<H").pack
    sop_class = str(t.ds.SOPClassUID).encode()
    variants = {
        "group length 0": lambda: b"\0\0\0\0\4\0\0\0\0\0\0\0" + c_store_rq(str(t.ds.SOPClassUID), sop)[12:],
        "group length huge": lambda: b"\0\0\0\0\4\0\0\0\xff\xff\xff\x7f" + c_store_rq(str(t.ds.SOPClassUID), sop)[12:],
        "command field 0x7FFF": lambda: _store_command(sop_class, sop, field=0x7FFF),
        "C-FIND-RQ on the CT context": lambda: _store_command(sop_class, sop, field=0x0020),
        "no AffectedSOPInstanceUID": lambda: command_set(
            [(0x0002, sop_class), (0x0100, us(1)), (0x0110, us(1)), (0x0700, us(0)), (0x0800, us(0))]
        ),  # fmt: skip
        "another AffectedSOPInstanceUID": lambda: c_store_rq(str(t.ds.SOPClassUID), random_uid(rng)),
        "no data set announced": lambda: _store_command(sop_class, sop, dataset_type=0x0101),
        "explicit VR command": lambda: _explicit_command(sop_class, sop),
        "element past the end": lambda: c_store_rq(str(t.ds.SOPClassUID), sop)[:-4] + b"\xff\xff",
    }
    name = rng.choice(sorted(variants))
    return name, t.session(rng, command=variants[name]())


def _store_command(sop_class: bytes, sop: str, field: int = 1, dataset_type: int = 0) -> bytes:
    us = struct.Struct("<H").pack
    return command_set([(0x0002, sop_class), (0x0100, us(field)), (0x0110, us(1)), (0x0700, us(0)),
                        (0x0800, us(dataset_type)), (0x1000, sop.encode())])  # fmt: skip


def _explicit_command(sop_class: bytes, sop: str) -> bytes:
    pad = lambda b: b + b"\0" * (len(b) % 2)  # noqa: E731
    fields = [(0x0002, b"UI", pad(sop_class)), (0x0100, b"US", b"\1\0"), (0x0110, b"US", b"\1\0"),
              (0x0700, b"US", b"\0\0"), (0x0800, b"US", b"\0\0"), (0x1000, b"UI", pad(sop.encode()))]  # fmt: skip
    body = b"".join(struct.pack("<HH2sH", 0, n, vr, len(v)) + v for n, vr, v in fields)
    return struct.pack("<HH2sHL", 0, 0, b"UL", 4, len(body)) + body


#: name -> mutator; the fuzzer draws them in turn, so each is sent about as often as the others
MUTATIONS: dict[str, Mutator] = {
    "pdu_truncate": pdu_truncate,
    "pdu_extend": pdu_extend,
    "pdu_length_flip": pdu_length_flip,
    "pdu_type_flip": pdu_type_flip,
    "pdu_length_oversized": pdu_length_oversized,
    "pdu_length_negative": pdu_length_negative,
    "associate_items": associate_items,
    "associate_fields": associate_fields,
    "pdv_fields": pdv_fields,
    "out_of_order": out_of_order,
    "pixel_data_short": pixel_data_short,
    "pixel_data_long": pixel_data_long,
    "wrong_transfer_syntax": wrong_transfer_syntax,
    "unknown_sop_class": unknown_sop_class,
    "deep_sequence": deep_sequence,
    "wrong_vr": wrong_vr,
    "element_length": element_length,
    "dataset_truncate": dataset_truncate,
    "command_fields": command_fields,
}
DATASET_MUTATIONS = ("pixel_data_short", "pixel_data_long", "wrong_transfer_syntax", "unknown_sop_class",
                     "deep_sequence", "wrong_vr", "element_length", "dataset_truncate", "command_fields")  # fmt: skip


def make_case(seed: int, index: int, base: Dataset, called: str, calling: str) -> tuple[str, str, str, list[Step]]:
    """Case ``index`` of a run: ``(mutation, variant, series UID, steps)``, the same for the same seed and index."""
    rng = random.Random(f"{seed}:{index}")
    names = sorted(MUTATIONS)
    name = names[index % len(names)]
    template = Template.fresh(base, called, calling, rng)
    series = template.series_uid
    variant, steps = MUTATIONS[name](rng, template)
    return name, variant, series, steps
