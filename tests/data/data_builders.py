"""Builders of synthetic inputs for the data tests: R lazy-load databases, SWORD zText modules, Debian
packages and generated text. Nothing here touches the network or the real packages."""

from __future__ import annotations

import io
import lzma
import random
import struct
import tarfile
import zlib
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# R serialization (XDR) of a character vector, and .rdb blobs


def r_character_vector(lines: list[str | None], version: int = 3, latin1: bool = False) -> bytes:
    out = b"X\n" + struct.pack(">iii", version, 0x040201, 0x030500)
    if version == 3:
        out += struct.pack(">i", 5) + b"UTF-8"
    out += struct.pack(">ii", 16, len(lines))  # STRSXP
    for line in lines:
        if line is None:
            out += struct.pack(">ii", 9, -1)  # NA_STRING
            continue
        raw = line.encode("latin-1" if latin1 else "utf-8")
        levels = (1 << 2) if latin1 else (1 << 3)  # LATIN1 / UTF8 encoding bits
        out += struct.pack(">ii", 9 | (levels << 12), len(raw)) + raw
    return out


def r_integer_vector(values: list[int]) -> bytes:
    # INTSXP (type 13): an R object that is not a character vector
    header = b"X\n" + struct.pack(">iii", 2, 0x040201, 0x020300) + struct.pack(">ii", 13, len(values))
    return header + b"".join(struct.pack(">i", v) for v in values)


def rdb_blob(payload: bytes, kind: str = "zlib") -> bytes:
    header = struct.pack(">I", len(payload))
    if kind == "zlib":
        return header + zlib.compress(payload)
    if kind == "xz":
        return header + b"X" + lzma.compress(payload)
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------
# SWORD zText module


def write_ztext(folder: Path, testaments: dict[str, list[list[str]]], orphan: str | None = None,
                duplicate_first: bool = False) -> Path:
    """Blocks of entries per testament -> <t>.bzs/.bzz/.bzv in `folder`.

    `orphan`: an extra block that no entry points at (real modules contain such leftovers).
    `duplicate_first`: a second index entry pointing at the first entry's text (linked verses).
    """
    folder.mkdir(parents=True, exist_ok=True)
    for testament, blocks in testaments.items():
        data, index, verses = b"", b"", struct.pack("<IIH", 0, 0, 0)  # entry 0 is empty, as in real modules
        raw_blocks = [[e.encode() for e in entries] for entries in blocks]
        if orphan is not None:
            raw_blocks.insert(1, [orphan.encode()])
        for number, entries in enumerate(raw_blocks):
            body = b"".join(entries)
            compressed = zlib.compress(body)
            index += struct.pack("<III", len(data), len(compressed), len(body))
            data += compressed
            if orphan is not None and number == 1:
                continue
            offset = 0
            for i, entry in enumerate(entries):
                verses += struct.pack("<IIH", number, offset, len(entry))
                if duplicate_first and number == 0 and i == 0:
                    verses += struct.pack("<IIH", number, offset, len(entry))
                offset += len(entry)
        (folder / f"{testament}.bzs").write_bytes(index)
        (folder / f"{testament}.bzz").write_bytes(data)
        (folder / f"{testament}.bzv").write_bytes(verses)
    return folder


BIBLE_OT = [
    [
        '<milestone type="x-importer" subType="x-osis2mod" n="$Rev$"/>',
        '<div sID="f1" type="front"/> <title type="main">Preface to this edition</title> '
        '<div sID="f2" type="x-p"/>The edition preface, not scripture.<div eID="f2" type="x-p"/>'
        '<div eID="f1" type="front"/>',
        '<chapter n="1" osisID="Gen.1" sID="Gen.1"/><div sID="p1" type="x-p"/>',
        '<w lemma="strong:H7225">In</w> <w>the</w> <w>beginning</w>, God<note placement="foot">'
        '<reference type="annotateRef">1:1 </reference>A footnote.</note><w>created</w> the heavens. ',
        "The earth was formless.",  # no trailing space: the next entry must not glue to it
        'God said, &#8220;Let there be light,&#8221;<note placement="foot">n</note> and there was light. '
        '<div eID="p1" type="x-p"/><chapter eID="Gen.1"/>',
    ],
    [
        '<div canonical="true" osisID="Ruth" sID="b2" type="book"/><title level="1" type="main">RUTH</title>'
        '<div sID="i1" type="introduction"/>An editorial introduction.<div eID="i1" type="introduction"/>'
        '<chapter n="1" osisID="Ruth.1" sID="Ruth.1"/>',
        '<lg sID="g1"/><l level="1" sID="l1"/>Where you go, I will go;<l eID="l1" level="1"/> '
        '<l level="2" sID="l2"/>where you stay, I will stay.<l eID="l2" level="2"/><lg eID="g1"/>',
    ],
]
BIBLE_NT = [
    [
        '<div canonical="true" osisID="Matt" sID="b3" type="book"/>'
        '<chapter n="1" osisID="Matt.1" sID="Matt.1"/>',
        "The book of the genealogy.<note>x</note> Jesus Christ,<note>y</note>the son of David. ",
    ],
]


# ---------------------------------------------------------------------------------------------
# Debian packages


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_deb(path: Path, files: dict[str, bytes]) -> Path:
    members = {"debian-binary": b"2.0\n", "control.tar.xz": _tar_xz({"control": b"Package: x\n"}),
               "data.tar.xz": _tar_xz(files)}
    out = b"!<arch>\n"
    for name, data in members.items():
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += header + data + (b"\n" if len(data) % 2 else b"")
    path.write_bytes(out)
    return path


# ---------------------------------------------------------------------------------------------
# generated text

WORDS = ("the a of and to in that was her his with for as had not be at by she it on which you all said very "
         "would could much been more such there their were have mister miss lady house letter morning "
         "evening garden sister brother friend family walk visit dinner ball marriage fortune").split()


def generated_documents(n: int, words: int = 60, seed: int = 0) -> list[str]:
    """`n` documents of pseudo-English, each tagged with a unique marker word `docNNNN`."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        body = " ".join(rng.choice(WORDS) for _ in range(words))
        docs.append(f"doc{i:04d} {body.capitalize()}.\n\nAnd {rng.choice(WORDS)} {rng.choice(WORDS)}.")
    return docs
