"""Fixtures for the data tests (builders in data_builders.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.data.data_builders import (
    BIBLE_NT,
    BIBLE_OT,
    generated_documents,
    make_deb,
    r_character_vector,
    r_integer_vector,
    rdb_blob,
    write_ztext,
)


@pytest.fixture
def demo_debs(tmp_path: Path) -> Path:
    """A folder with synthetic stand-ins for r-cran-janeaustenr and sword-text-web."""
    folder = tmp_path / "debs"
    folder.mkdir()
    body = [f"Line {i} of a novel, with some words in it." for i in range(40)]
    rdb = (rdb_blob(r_character_vector(["EMMA", "", "By Jane Austen", None, *body]))
           + rdb_blob(r_integer_vector([1, 2, 3]))
           + rdb_blob(r_character_vector(["Persuasion", "", *body], version=2), kind="xz"))
    make_deb(folder / "r-cran-janeaustenr_1.0.0-1_all.deb",
             {"usr/lib/R/site-library/janeaustenr/data/Rdata.rdb": rdb,
              "usr/lib/R/site-library/janeaustenr/DESCRIPTION": b"Package: janeaustenr\n"})
    module = write_ztext(tmp_path / "module", {"ot": BIBLE_OT, "nt": BIBLE_NT})
    make_deb(folder / "sword-text-web_426.0-1_all.deb",
             {f"usr/share/sword/modules/texts/ztext/engWEB2015eb/{p.name}": p.read_bytes()
              for p in sorted(module.iterdir())})
    return folder


@pytest.fixture
def corpus_files(tmp_path: Path) -> Path:
    """A folder of generated text: three .txt files (one document each) and a .jsonl with 61 more."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    docs = generated_documents(64)
    for i in range(3):
        (folder / f"book{i}.txt").write_text(docs[i] + "\n")
    with open(folder / "web.jsonl", "w") as f:
        for doc in docs[3:]:
            f.write(json.dumps({"text": doc, "id": doc[:7]}) + "\n")
    return folder
