"""osp.tables.format_rows: the one table formatter (text and Markdown)."""

from osp.tables import format_rows


def test_text_table_left_aligns_names_and_right_aligns_numbers():
    rows = [["arm", "ppl"], ["adam", 121.5], ["osp", "9"]]
    assert format_rows(rows).splitlines() == ["arm     ppl", "----  -----", "adam  121.5", "osp       9"]


def test_markdown_table_escapes_pipes():
    rows = [["arm", "max|h|"], ["osp", "67.5"]]
    assert format_rows(rows, markdown=True).splitlines() == [
        "| arm | max\\|h\\| |", "|-----|----------|", "| osp |     67.5 |"]
