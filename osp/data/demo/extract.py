"""Pure-Python readers for the demo corpus packages: Debian .deb archives, R lazy-load databases
(Jane Austen's novels in `r-cran-janeaustenr`) and SWORD zText modules (the public-domain English
bible in `sword-text-web`).

Only the standard library is used, so the demo corpus builds on a machine without R, SWORD or
dpkg (dpkg-deb is used only as a fallback for .deb compressions Python cannot read, e.g. zstd).
"""

from __future__ import annotations

import bz2
import html
import io
import lzma
import re
import shutil
import struct
import subprocess
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Debian packages
# ---------------------------------------------------------------------------------------------

_AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60


def _ar_members(data: bytes) -> dict[str, bytes]:
    if not data.startswith(_AR_MAGIC):
        raise ValueError("not a Debian package (missing the ar archive signature)")
    members: dict[str, bytes] = {}
    pos = len(_AR_MAGIC)
    while pos + _AR_HEADER <= len(data):
        header = data[pos : pos + _AR_HEADER]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        start = pos + _AR_HEADER
        members[name] = data[start : start + size]
        pos = start + size + (size & 1)  # members are 2-byte aligned
    return members


def read_deb_files(deb: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """Return {path inside the package: contents} for the regular files of `deb` that `wanted` accepts.

    Paths are normalised without the leading "./" (e.g. "usr/share/doc/x/copyright").
    """
    members = _ar_members(Path(deb).read_bytes())
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None:
        raise ValueError(f"{deb}: no data.tar member")
    try:
        archive = tarfile.open(fileobj=io.BytesIO(members[data_name]), mode="r:*")
    except tarfile.ReadError:
        archive = _open_with_dpkg_deb(deb, data_name)
    files: dict[str, bytes] = {}
    with archive:
        for info in archive:
            path = info.name.removeprefix("./")
            if info.isfile() and wanted(path):
                handle = archive.extractfile(info)
                assert handle is not None
                files[path] = handle.read()
    return files


def _open_with_dpkg_deb(deb: Path, data_name: str) -> tarfile.TarFile:
    if shutil.which("dpkg-deb") is None:
        raise RuntimeError(
            f"{deb}: {data_name} uses a compression Python cannot read and dpkg-deb is not installed; "
            "unpack it with `dpkg-deb -x` or `ar x` + `tar` on a machine that can"
        )
    command = ["dpkg-deb", "--fsys-tarfile", str(deb)]
    tar_bytes = subprocess.run(command, check=True, capture_output=True).stdout
    return tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:")


# ---------------------------------------------------------------------------------------------
# R lazy-load database (.rdb) -> character vectors
# ---------------------------------------------------------------------------------------------

_STRSXP = 16
_CHARSXP = 9
# Encoding flags of a CHARSXP, stored in the "levels" field (bits 12+ of the flags word).
_LATIN1 = 1 << 2
_BYTES = 1 << 1


def _decompress_blob(data: bytes, pos: int) -> tuple[bytes, int]:
    """Decode one .rdb blob starting at `pos`: a 4-byte big-endian uncompressed length, then the payload.

    R writes zlib streams by default; `compress = 2/3` databases put a type byte ("2" bzip2,
    "X" xz, "Z" zlib, "0" stored) before the stream. Returns (payload, position of the next blob).
    """
    (length,) = struct.unpack_from(">I", data, pos)
    start = pos + 4
    kind = data[start : start + 1]
    if kind == b"0":
        return data[start + 1 : start + 1 + length], start + 1 + length
    if kind in (b"2", b"X", b"Z"):
        start += 1
    decoder: zlib._Decompress | bz2.BZ2Decompressor | lzma.LZMADecompressor
    decoder = {b"2": bz2.BZ2Decompressor, b"X": lzma.LZMADecompressor}.get(kind, zlib.decompressobj)()
    payload = decoder.decompress(data[start:])
    if len(payload) != length:
        raise ValueError(f"corrupt .rdb blob at byte {pos}: expected {length} bytes, got {len(payload)}")
    return payload, len(data) - len(decoder.unused_data)


def _read_character_vector(blob: bytes) -> list[str | None] | None:
    """Parse an XDR R serialization; return its elements if the top object is a character vector."""
    if not blob.startswith(b"X\n"):
        raise ValueError("unsupported R serialization (only the XDR format 'X' is read)")
    version, _writer, _reader = struct.unpack_from(">iii", blob, 2)
    pos = 14
    if version == 3:  # v3 adds the writer's native encoding name
        (n,) = struct.unpack_from(">i", blob, pos)
        pos += 4 + n
    flags, length = struct.unpack_from(">ii", blob, pos)
    pos += 8
    if flags & 0xFF != _STRSXP:
        return None
    if length == -1:  # long vector: the length follows as two 32-bit halves
        hi, lo = struct.unpack_from(">II", blob, pos)
        length, pos = (hi << 32) | lo, pos + 8
    out: list[str | None] = []
    for _ in range(length):
        flags, n = struct.unpack_from(">ii", blob, pos)
        pos += 8
        if flags & 0xFF != _CHARSXP:
            raise ValueError(f"malformed character vector: element of type {flags & 0xFF}")
        if n == -1:
            out.append(None)
            continue
        raw = blob[pos : pos + n]
        pos += n
        levels = flags >> 12
        encoding = "latin-1" if levels & _LATIN1 and not levels & _BYTES else "utf-8"
        out.append(raw.decode(encoding, errors="replace"))
    return out


def read_rdb_character_vectors(data: bytes) -> list[list[str | None]]:
    """All character vectors stored in an R lazy-load database, in file order (None = NA)."""
    vectors = []
    pos = 0
    while pos < len(data):
        blob, pos = _decompress_blob(data, pos)
        vector = _read_character_vector(blob)
        if vector is not None:
            vectors.append(vector)
    return vectors


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")


def extract_austen(rdb: bytes) -> dict[str, str]:
    """{slug of the title: text} for each novel (one line per vector element, NA -> empty line)."""
    novels = {}
    for lines in read_rdb_character_vectors(rdb):
        text_lines = ["" if line is None else line for line in lines]
        title = next((line.strip() for line in text_lines if line.strip()), "")
        if not title:
            continue
        novels[_slug(title)] = "\n".join(text_lines).strip() + "\n"
    return novels


# ---------------------------------------------------------------------------------------------
# SWORD zText module -> plain text per book
# ---------------------------------------------------------------------------------------------


def read_ztext_verses(module_dir: Path) -> list[str]:
    """OSIS markup of every entry of a zText module in versification order (old testament first).

    Three files per testament: `<t>.bzs` (12-byte records: offset, compressed size, uncompressed size
    of each zlib block in `<t>.bzz`) and `<t>.bzv` (10-byte records: block number, offset and length
    of one entry inside the uncompressed block). Reading through the entry index, rather than
    concatenating blocks, skips the orphaned and duplicated blocks that real modules contain;
    entries that point at the same text (linked verses) are kept once.
    """
    module_dir = Path(module_dir)
    entries: list[str] = []
    for testament in ("ot", "nt"):
        paths = [module_dir / f"{testament}.{ext}" for ext in ("bzs", "bzz", "bzv")]
        if not paths[0].exists():
            continue
        missing = [p.name for p in paths if not p.exists()]
        if missing:
            raise ValueError(f"{module_dir}: incomplete zText module, missing {', '.join(missing)}")
        index, data, verses = (p.read_bytes() for p in paths)
        blocks: dict[int, bytes] = {}
        records = list(struct.iter_unpack("<III", index[: len(index) // 12 * 12]))
        seen: set[tuple[int, int]] = set()
        for block, start, size in struct.iter_unpack("<IIH", verses[: len(verses) // 10 * 10]):
            if size == 0 or (block, start) in seen:
                continue
            seen.add((block, start))
            if block not in blocks:
                offset, compressed, _ = records[block]
                blocks[block] = zlib.decompress(data[offset : offset + compressed])
            entries.append(blocks[block][start : start + size].decode("utf-8", errors="replace"))
    if not entries:
        raise ValueError(f"{module_dir}: no zText entries (expected ot.bzs/.bzz/.bzv and/or nt.*)")
    return entries


_NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.S)
_TITLE = re.compile(r"<title\b[^>]*>.*?</title>", re.S)
_VERSE_MARKER = re.compile(r"<div\b[^>]*type=\"x-milestone\"[^>]*/>")
_LINE_END = re.compile(r"<l\b[^>]*\beID=[^>]*/>|</l>")
_LINE_START = re.compile(r"<(?:l|lb|item)\b[^>]*>")
_BLOCK = re.compile(r"</?(?:p|div|lg|list|chapter)\b[^>]*>")
_TAG = re.compile(r"<[^>]+>")
_GLUE = "\x01"  # stands for a removed footnote until we know whether it sat between two words


def osis_to_text(osis: str) -> str:
    """Plain text of OSIS markup: footnotes and headings dropped, paragraphs and poetry lines kept."""
    text = _NOTE.sub(_GLUE, osis)
    text = _TITLE.sub("\n\n", text)
    text = _VERSE_MARKER.sub("", text)
    # Poetry and list lines are milestones (<l sID/> ... <l eID/>): one newline at each start only,
    # otherwise every line of a psalm would be followed by a blank line.
    text = _LINE_END.sub("", text)
    text = _LINE_START.sub("\n", text)
    text = _BLOCK.sub("\n\n", text)
    text = _TAG.sub("", text)
    text = html.unescape(text).replace("\x00", "")
    # A footnote anchored between two words ("God<note>..</note>created", "Christ,<note>..</note>the")
    # must leave a space; one before punctuation or a space must not.
    text = re.sub(rf"(?<=\S){_GLUE}+(?=[\w“‘(\[])", " ", text).replace(_GLUE, "")
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


_MARKER = re.compile(r"<(div|chapter)\b([^>]*)>")
_ATTR = re.compile(r"(\w+)=\"([^\"]*)\"")
_EDITORIAL = ("front", "introduction")  # the edition's preface and book introductions, not the text


def split_osis_books(osis: str) -> list[tuple[str, str]]:
    """Split a whole module's OSIS into [(book id, OSIS of the book)], dropping editorial sections.

    A book starts at a `<div type="book" osisID=..>` milestone, or at a chapter whose osisID names
    a new book (the first book of a module may lack the milestone).
    """
    books: list[tuple[str, list[str]]] = []
    skipping: str | None = None
    pos = 0

    def emit(text: str) -> None:
        if skipping is None and books:
            books[-1][1].append(text)

    for match in _MARKER.finditer(osis):
        emit(osis[pos : match.start()])
        pos = match.end()
        attrs = dict(_ATTR.findall(match.group(2)))
        if match.group(1) == "div":
            if skipping is not None:
                if attrs.get("eID") == skipping:
                    skipping = None
                continue
            if attrs.get("type") in _EDITORIAL and "sID" in attrs:
                skipping = attrs["sID"]
                continue
            if attrs.get("type") == "book" and "sID" in attrs and "osisID" in attrs:
                books.append((attrs["osisID"], []))
                continue
        else:
            book = attrs.get("osisID", "").split(".")[0]
            if book and (not books or books[-1][0] != book):
                skipping = None
                books.append((book, []))
        emit(match.group(0))
    emit(osis[pos:])
    return [(book, "".join(parts)) for book, parts in books]


def extract_bible_books(module_dir: Path) -> list[tuple[str, str]]:
    """[(OSIS book id, plain text)] of a zText module, in versification order."""
    books = []
    # Entries are joined with a space: a few verses lack a trailing one ("Kingdom.That").
    for book, osis in split_osis_books(" ".join(read_ztext_verses(module_dir))):
        text = osis_to_text(osis)
        if text:
            books.append((book, text + "\n"))
    return books
