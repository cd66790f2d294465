"""Extractors on hand-built fixtures: .deb archives, R lazy-load databases, SWORD zText modules."""

from __future__ import annotations

import struct
import zlib

import pytest

from osp.data.demo.extract import (
    extract_austen,
    extract_bible_books,
    osis_to_text,
    read_deb_files,
    read_rdb_character_vectors,
    read_ztext_verses,
)
from tests.data.data_builders import (
    BIBLE_NT,
    BIBLE_OT,
    make_deb,
    r_character_vector,
    r_integer_vector,
    rdb_blob,
    write_ztext,
)


def test_rdb_reads_character_vectors_and_skips_other_objects():
    data = (rdb_blob(r_character_vector(["A", None, "b\u00e9"]))
            + rdb_blob(r_integer_vector([7, 8]))
            + rdb_blob(r_character_vector(["caf\u00e9"], version=2, latin1=True), kind="xz"))
    assert read_rdb_character_vectors(data) == [["A", None, "b\u00e9"], ["caf\u00e9"]]


def test_rdb_rejects_a_truncated_blob():
    blob = rdb_blob(r_character_vector(["x" * 100]))
    with pytest.raises((ValueError, zlib.error, struct.error)):
        read_rdb_character_vectors(blob[:20])


def test_austen_novels_are_named_after_their_title_and_na_is_an_empty_line():
    data = (rdb_blob(r_character_vector(["", "SENSE AND SENSIBILITY", "", "Chapter 1", None, "Text."]))
            + rdb_blob(r_character_vector(["Persuasion", "by", "Jane Austen"])))
    novels = extract_austen(data)
    assert list(novels) == ["sense_and_sensibility", "persuasion"]
    assert novels["sense_and_sensibility"] == "SENSE AND SENSIBILITY\n\nChapter 1\n\nText.\n"
    assert novels["persuasion"] == "Persuasion\nby\nJane Austen\n"


def test_deb_reader_returns_selected_files(tmp_path):
    deb = make_deb(tmp_path / "pkg_1.0_all.deb", {"usr/share/a/x.txt": b"x", "usr/share/b/odd": b"y" * 3})
    assert read_deb_files(deb, lambda p: p.startswith("usr/share/")) == {"usr/share/a/x.txt": b"x",
                                                                        "usr/share/b/odd": b"yyy"}
    assert read_deb_files(deb, lambda p: p.endswith(".txt")) == {"usr/share/a/x.txt": b"x"}


def test_deb_reader_rejects_other_files(tmp_path):
    path = tmp_path / "not.deb"
    path.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ValueError, match="ar archive"):
        read_deb_files(path, lambda p: True)


def test_ztext_reads_entries_through_the_verse_index(tmp_path):
    module = write_ztext(tmp_path / "m", {"ot": [["<a>one </a>", "two "], ["three"]]},
                         orphan="ORPHAN BLOCK", duplicate_first=True)
    # The orphaned block is skipped and the linked (duplicate) entry kept once.
    assert read_ztext_verses(module) == ["<a>one </a>", "two ", "three"]


def test_ztext_missing_files_are_reported(tmp_path):
    module = write_ztext(tmp_path / "m", {"ot": [["x"]]})
    (module / "ot.bzv").unlink()
    with pytest.raises(ValueError, match="missing ot.bzv"):
        read_ztext_verses(module)
    with pytest.raises(ValueError, match="no zText entries"):
        read_ztext_verses(tmp_path)


def test_osis_markup_to_plain_text():
    osis = ('<title type="x">Heading</title><div sID="a" type="x-p"/>God<note>fn</note><w>created</w> all.'
            '<note>n</note> Then &amp; now,<note>z</note>\u201cyes\u201d<div eID="a" type="x-p"/>'
            '<lg sID="g"/><l sID="l1"/>line one<l eID="l1"/> <l sID="l2"/>line two<l eID="l2"/><lg eID="g"/>'
            "x\x00y")
    assert osis_to_text(osis) == "God created all. Then & now, \u201cyes\u201d\n\nline one\nline two\n\nxy"


def test_bible_books_split_and_cleaned(tmp_path):
    module = write_ztext(tmp_path / "m", {"ot": BIBLE_OT, "nt": BIBLE_NT}, orphan="<w>ORPHAN</w>")
    books = extract_bible_books(module)
    assert [book for book, _ in books] == ["Gen", "Ruth", "Matt"]
    gen, ruth, matt = (text for _, text in books)
    assert gen == ("In the beginning, God created the heavens. The earth was formless. God said, "
                   "\u201cLet there be light,\u201d and there was light.\n")
    assert ruth == "Where you go, I will go;\nwhere you stay, I will stay.\n"
    assert matt == "The book of the genealogy. Jesus Christ, the son of David.\n"
    text = "".join(t for _, t in books)
    for dropped in ("Preface", "preface", "editorial", "RUTH", "footnote", "ORPHAN", "<", "importer"):
        assert dropped not in text
