"""Protobuf's wire format, just enough to find and replace a nested message in a serialized
DataFusion plan (spiced/cluster/stages.py): DataFusion's Python binding serializes and decodes
physical plans but offers no way to edit one, and its .proto files are not shipped with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


class WireError(ValueError):
    """Bytes that are not the protobuf message expected."""


LEN = 2  # the wire type of a length-delimited field (a nested message, bytes)


@dataclass(frozen=True, slots=True)
class Field:
    number: int
    wire: int
    start: int  # the key's first byte
    body: int  # the value's first byte (after the length, for a length-delimited field)
    end: int


def varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(buf):
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise WireError("a truncated protobuf varint")


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def fields(buf: bytes | memoryview) -> list[Field]:
    fields, pos = [], 0
    while pos < len(buf):
        key, body = varint(buf, pos)
        wire = key & 7
        if wire == 0:
            end = varint(buf, body)[1]
        elif wire == 1:
            end = body + 8
        elif wire == 5:
            end = body + 4
        elif wire == LEN:
            size, body = varint(buf, body)
            end = body + size
        else:
            raise WireError(f"protobuf wire type {wire}")
        if end > len(buf):
            raise WireError("a truncated protobuf field")
        fields.append(Field(key >> 3, wire, pos, body, end))
        pos = end
    return fields


def operator(node: bytes) -> Field:
    """The one field of a serialized plan node: its operator."""
    found = fields(node)
    if len(found) != 1 or found[0].wire != LEN:
        raise WireError("a plan node that is not one operator message")
    return found[0]


def at(buf: bytes, path: tuple[int, ...]) -> bytes:
    for index in path:
        f = fields(buf)[index]
        buf = buf[f.body:f.end]
    return buf


def rewrite(buf: bytes, edits: Mapping[tuple[int, ...], bytes]) -> bytes:
    """`buf` with the length-delimited field at each path (field positions, outermost first)
    replaced by the given bytes, the lengths of the messages around it updated."""
    return b"".join(_pieces(memoryview(buf), edits))


def _pieces(buf: memoryview, edits: Mapping[tuple[int, ...], bytes]) -> list[bytes | memoryview]:
    """`rewrite`'s result in pieces, joined once: a stage's results can weigh megabytes."""
    if () in edits:
        return [edits[()]]
    found = fields(buf)
    nested: dict[int, dict[tuple[int, ...], bytes]] = {}
    for path, value in edits.items():
        nested.setdefault(path[0], {})[path[1:]] = value
    out: list[bytes | memoryview] = []
    pos = 0
    for index in sorted(nested):
        f = found[index]
        inner = _pieces(buf[f.body:f.end], nested[index])
        out += [buf[pos:f.start], encode_varint(f.number << 3 | LEN), encode_varint(sum(len(p) for p in inner))]
        out += inner
        pos = f.end
    out.append(buf[pos:])
    return out
