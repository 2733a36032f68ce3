"""Splitting a query's physical plan into stages that run on executors, and putting the final plan
together from their results (the scheduler side of spiced/cluster/execution.py, which says what is
distributed and why)."""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
from datafusion import ExecutionPlan, SessionContext

from ..errors import QueryError
from . import protowire

# Operators whose output partition i is computed from their input's partition i alone.
_PARTITION_LOCAL = frozenset({"FilterExec", "ProjectionExec", "CoalesceBatchesExec", "CooperativeExec",
                              "AggregateExec", "SortExec", "LocalLimitExec", "GlobalLimitExec"})
_CONSTANT_LEAVES = frozenset({"PlaceholderRowExec", "EmptyExec"})
_FILE_SCAN = re.compile(r"DataSourceExec: file_groups=\{.*, file_type=(parquet|csv|json)\b")
_EMPTY_GROUPS = re.compile(r"file_groups=\{\d+ groups?: \[(\[\](, )?)+\]\}")


class _NotDistributable(Exception):
    """A plan, or a part of it, that does not leave the scheduler."""


# A plan's outline: each operator's name and partition count ("" at a stage, whose inside may change).
_Shape = tuple[str, int, tuple["_Shape", ...]]


@dataclass(frozen=True, slots=True)
class Stage:
    plan: bytes  # the serialized subtree
    partitions: int
    path: tuple[int, ...]  # where it sits in the serialized plan: field positions, outermost first
    empty: bytes  # the subtree reading no file: what stands for it when no partition has a row


@dataclass(frozen=True, slots=True)
class Split:
    plan: bytes  # the whole serialized plan
    stages: tuple[Stage, ...]
    shape: _Shape

    @property
    def whole(self) -> bool:
        """The plan is one stage: its partitions are the result."""
        return self.stages[0].path == ()


@dataclass(frozen=True, slots=True)
class _Candidate:
    plan: ExecutionPlan
    encoded: bytes
    path: tuple[int, ...]
    scans: list[tuple[int, ...]]  # absolute paths


@dataclass(slots=True)
class _Visit:
    local: bool  # the subtree is partition-local down to its file scans
    stages: list[_Candidate]  # stages below (when not local)
    scans: list[tuple[int, ...]]  # file scans below (when local)
    shape: _Shape


def split_plan(plan: ExecutionPlan, ctx: SessionContext) -> Split | None:
    """The stages of `plan` to run on executors; None when the plan stays on the scheduler. `ctx`
    is the session that planned it (with its object stores: DataFusion decodes a scan only where
    its store is registered)."""
    try:  # _NotDistributable, or DataFusion cannot serialize an operator (information_schema's)
        encoded = plan.to_bytes()
        visit = _visit(plan, encoded, ())
        candidates = [_Candidate(plan, encoded, (), visit.scans)] if visit.local else visit.stages
        stages = [_stage(candidate, ctx) for candidate in candidates]
    except Exception:
        return None
    return Split(encoded, tuple(stages), visit.shape) if stages else None


def _visit(plan: ExecutionPlan, encoded: bytes, path: tuple[int, ...]) -> _Visit:
    name, partitions = _name(plan), plan.partition_count
    children = _located(plan, encoded)
    if not children:
        if _FILE_SCAN.match(plan.display()):
            return _Visit(True, [], [path], ("", partitions, ()))
        if name in _CONSTANT_LEAVES:
            return _Visit(False, [], [], (name, partitions, ()))
        raise _NotDistributable(name)
    visits = [_visit(child, data, path + at) for child, data, at in children]
    if name in _PARTITION_LOCAL and all(v.local for v in visits):
        return _Visit(True, [], [scan for v in visits for scan in v.scans], ("", partitions, ()))
    stages: list[_Candidate] = []
    for v, (child, data, at) in zip(visits, children, strict=True):
        stages += [_Candidate(child, data, path + at, v.scans)] if v.local else v.stages
    return _Visit(False, stages, [], (name, partitions, tuple(v.shape for v in visits)))


def _stage(candidate: _Candidate, ctx: SessionContext) -> Stage:
    plan, path = candidate.plan, candidate.path
    empty = _without_files(candidate.encoded, [scan[len(path):] for scan in candidate.scans])
    decoded = ExecutionPlan.from_bytes(ctx, empty)
    if decoded.partition_count != plan.partition_count or not _reads_nothing(decoded):
        raise _NotDistributable("the stage cannot be emptied")
    return Stage(candidate.encoded, plan.partition_count, path, empty)


def _without_files(stage: bytes, scans: list[tuple[int, ...]]) -> bytes:
    """The stage with every file group of its scans emptied: the same schema and partitions, and
    nothing read. (Stage results without a row carry no schema to build an in-memory source with.)"""
    edits: dict[tuple[int, ...], bytes] = {}
    for scan in scans:
        # A file scan operator's field 1 is its FileScanExecConf, whose field 1 is the file groups.
        operator = protowire.at(stage, scan + (0,))
        conf_index = next((i for i, f in enumerate(protowire.fields(operator)) if f.number == 1), None)
        if conf_index is None:
            raise _NotDistributable("a file scan without its configuration")
        for group, f in enumerate(protowire.fields(protowire.at(operator, (conf_index,)))):
            if f.number == 1:
                edits[scan + (0, conf_index, group)] = b""
    return protowire.rewrite(stage, edits)


def _reads_nothing(plan: ExecutionPlan) -> bool:
    children = plan.children()
    if children:
        return all(_reads_nothing(child) for child in children)
    return _EMPTY_GROUPS.search(plan.display()) is not None


def _name(plan: ExecutionPlan) -> str:
    return plan.display().split(":", 1)[0].strip()


def _located(plan: ExecutionPlan, encoded: bytes) -> list[tuple[ExecutionPlan, bytes, tuple[int, int]]]:
    """Each child of `plan`, serialized, with its position in `encoded`. A serialized plan node is a
    message of one field, the operator, whose own fields include its children, each serialized as
    it would be alone."""
    children = plan.children()
    if not children:
        return []
    operator = protowire.operator(encoded)
    body = encoded[operator.body:operator.end]
    fields = protowire.fields(body)
    taken: set[int] = set()
    located = []
    for child in children:
        data = child.to_bytes()
        index = next((i for i, f in enumerate(fields)
                      if i not in taken and f.wire == protowire.LEN and body[f.body:f.end] == data), None)
        if index is None:
            raise _NotDistributable(f"{_name(child)} is not found in the encoding of {_name(plan)}")
        taken.add(index)
        located.append((child, data, (0, index)))
    return located


# --- Putting the final plan together from the stages' results ---------------------------------

@functools.cache
def _scratch() -> SessionContext:
    """A plain session, where stage results become in-memory plans."""
    return SessionContext()


def _in_memory(tables: Sequence[pa.Table | None]) -> bytes | None:
    """A serialized source with the tables as its partitions, one for one; None when all are empty
    (without a batch there is no schema to give it)."""
    schema = next((t.schema for t in tables if t is not None), None)
    if schema is None:
        return None
    empty = pa.RecordBatch.from_pylist([], schema=schema)
    # One batch a partition: DataFusion serializes an in-memory source at about a millisecond a batch.
    partitions = [(t.combine_chunks().to_batches() if t is not None else []) or [empty] for t in tables]
    name = f"stage_{uuid.uuid4().hex}"
    _scratch().register_record_batches(name, partitions)
    try:
        return _scratch().table(name).execution_plan().to_bytes()
    finally:
        _scratch().deregister_table(name)


def _matches(plan: ExecutionPlan, shape: _Shape) -> bool:
    name, partitions, children = shape
    if plan.partition_count != partitions:
        return False
    if not name:
        return True
    kids = plan.children()
    return (_name(plan) == name and len(kids) == len(children)
            and all(_matches(kid, child) for kid, child in zip(kids, children, strict=True)))


def final_plan(ctx: SessionContext, split: Split, results: Sequence[Sequence[pa.Table | None]]) -> ExecutionPlan:
    """The plan with each stage replaced by its results, decoded in `ctx` (the runtime's session:
    what is not distributed may need its functions)."""
    edits = {stage.path: _in_memory(tables) or stage.empty
             for stage, tables in zip(split.stages, results, strict=True)}
    plan = ExecutionPlan.from_bytes(ctx, protowire.rewrite(split.plan, edits))
    if not _matches(plan, split.shape):
        raise QueryError("Cluster execution failed: the final plan does not match the planned one")
    return plan
