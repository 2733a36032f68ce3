"""What every part of the engine needs to know about a statement: the read-only options it is
planned with, and which tables a plan reads."""

from __future__ import annotations

from datafusion import LogicalPlan, SQLOptions

READ_ONLY = SQLOptions().with_allow_ddl(False).with_allow_dml(False).with_allow_statements(False)


def scanned(plan: LogicalPlan | str) -> list[tuple[str | None, str | None, str]]:
    """(catalog, schema, table) of every TableScan in `plan` (or its `display_indent()` text), as
    written in the query. Read from the plan's text, which also shows the scans inside subquery
    expressions (those are not plan inputs, so a walk over `inputs()` would miss them)."""
    found: list[tuple[str | None, str | None, str]] = []
    text = plan if isinstance(plan, str) else plan.display_indent()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("TableScan: "):
            *qualifiers, table = line.removeprefix("TableScan: ").split(" ", 1)[0].split(".")
            schema = qualifiers[-1] if qualifiers else None
            catalog = qualifiers[-2] if len(qualifiers) > 1 else None
            found.append((catalog, schema, table))
    return found


def dataset_name(catalog: str | None, schema: str | None, table: str) -> str | None:
    """The spicepod name a table reference resolves to in `spice.public` (None: another catalog)."""
    if catalog not in (None, "spice"):
        return None
    return table if schema in (None, "public") else f"{schema}.{table}"
