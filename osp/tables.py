"""Aligned text and Markdown tables: the one formatter behind `osp report`, the benches and the paper
table."""

from __future__ import annotations


def format_rows(rows: list[list[object]] | list[tuple[object, ...]], markdown: bool = False,
                listing: bool = False) -> str:
    """Rows of cells (header first) as aligned text or a Markdown table: first column left-aligned,
    the others (numbers) right-aligned, a rule under the header. `listing`: every column left-aligned, no
    rule, each line indented by two spaces (the `osp data` listings of names and paths)."""
    rows = [[str(cell) for cell in row] for row in rows]
    if markdown:  # a literal | (max|h|) would split the cell
        rows = [[cell.replace("|", "\\|") for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    if listing:
        return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                         for row in rows)

    def line(row: list[str]) -> str:
        numbers = (cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))
        cells = [row[0].ljust(widths[0]), *numbers]
        return ("| " + " | ".join(cells) + " |") if markdown else "  ".join(cells)

    if markdown:
        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    else:
        rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), rule, *(line(row) for row in rows[1:])])
