"""spiced/cluster/protowire.py against the protobuf library, the encoder and decoder of record."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor_pb2 import DescriptorProto, FieldDescriptorProto, FileDescriptorProto
from hypothesis import given
from hypothesis import strategies as st

from spiced.cluster import protowire


def file_with(*names: str, fields: int = 2) -> FileDescriptorProto:
    message = FileDescriptorProto(name="plan.proto", package="p", syntax="proto3")
    for name in names:
        message.message_type.append(DescriptorProto(name=name, field=[
            FieldDescriptorProto(name=f"f{i}", number=i + 1, type=FieldDescriptorProto.TYPE_INT64)
            for i in range(fields)]))
    return message


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_varints_round_trip(value: int) -> None:
    assert protowire.varint(protowire.encode_varint(value), 0) == (value, len(protowire.encode_varint(value)))


def test_fields_are_found_where_protobuf_put_them() -> None:
    message = file_with("A", "B")
    data = message.SerializeToString()
    found = protowire.fields(data)
    assert [f.number for f in found] == [1, 2, 4, 4, 12]  # name, package, message_type x2, syntax
    second = next(f for i, f in enumerate(found) if f.number == 4 and i == 3)
    assert DescriptorProto.FromString(data[second.body:second.end]).name == "B"


@pytest.mark.parametrize("fields", [0, 3, 200])  # a replacement shorter, close to and far longer (a multi-byte length)
def test_a_nested_message_replaced_deep_down_decodes_with_protobuf(fields: int) -> None:
    data = file_with("A", "B", "C").SerializeToString()
    replacement = DescriptorProto(name="Bee", field=[
        FieldDescriptorProto(name=f"g{i}", number=i + 1, type=FieldDescriptorProto.TYPE_STRING) for i in range(fields)])
    # message_type[1] is field position 3; inside it, its name is position 0.
    whole = protowire.rewrite(data, {(3,): replacement.SerializeToString()})
    assert [m.name for m in FileDescriptorProto.FromString(whole).message_type] == ["A", "Bee", "C"]
    assert len(FileDescriptorProto.FromString(whole).message_type[1].field) == fields
    deep = protowire.rewrite(data, {(3, 0): b"renamed", (4, 0): b"x" * 300})
    assert [m.name for m in FileDescriptorProto.FromString(deep).message_type] == ["A", "renamed", "x" * 300]
    assert protowire.at(data, (4, 0)) == b"C"


def test_bytes_that_are_not_a_message_are_refused() -> None:
    with pytest.raises(protowire.WireError):
        protowire.fields(b"\x0a\x05ab")  # a length past the end
    with pytest.raises(protowire.WireError):
        protowire.fields(b"\x0b")  # wire type 3 (groups) is not used by DataFusion
    with pytest.raises(protowire.WireError):
        protowire.operator(file_with("A").SerializeToString())  # several fields: not a plan node
