"""Formatting results: plain-text tables and the JSON file.

Figures are printed as measured (whole messages per second with thousands
separators, ratios to two decimals); the JSON file keeps full precision.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns right-aligned except the first and the last (labels, notes)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, (cell, width) in enumerate(zip(cells, widths)):
            out.append(cell.ljust(width) if i in (0, len(widths) - 1) else cell.rjust(width))
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def count(value: float | int | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def cores(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:,.1f}"


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
