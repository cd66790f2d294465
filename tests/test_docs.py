"""The documentation: every marked output block is what its command prints (docs/regenerate.py), the marker
parsing and diffing behind that check, and the links between the pages."""

import importlib.util
import io
import re
import sys
from pathlib import Path

import pytest

from tests.support.cli import REPO

_SPEC = importlib.util.spec_from_file_location("osp_docs_regenerate", REPO / "docs" / "regenerate.py")
regenerate = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = regenerate  # dataclasses look their module up while the class is built
_SPEC.loader.exec_module(regenerate)

PAGE = """# A page

<!-- regenerate: printf 'one\\ntwo\\n' -->
```
one
two
```

Some prose.

    <!-- regenerate: an indented example, not a marker -->

````markdown
<!-- regenerate: inside a fence, not a marker -->
```
x
```
````

<!--regenerate:printf 'x'-->
~~~text
old
~~~
"""


def write_repo(root: Path, readme: str, page: str | None = None) -> Path:
    (root / "docs").mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text(readme)
    if page is not None:
        (root / "docs" / "page.md").write_text(page)
    return root


def test_markers_are_found_with_their_command_and_block_and_code_is_skipped():
    blocks = regenerate.find_blocks(PAGE)
    assert [b.command for b in blocks] == ["printf 'one\\ntwo\\n'", "printf 'x'"]
    first, second = blocks
    assert first.content == "one\ntwo" and first.marker_line == 3
    lines = PAGE.split("\n")
    assert lines[first.start] == "one" and lines[first.end] == "```"
    assert second.content == "old" and lines[second.end] == "~~~"


@pytest.mark.parametrize("text, words", [
    ("<!-- regenerate: echo hi -->\n\n```\nhi\n```\n", "not followed by a fence"),
    ("<!-- regenerate: echo hi -->\n```\nhi\n", "never closed"),
    ("<!-- regenerate:  -->\n```\nhi\n```\n", "without a command"),
])
def test_a_broken_marker_names_its_line(text, words):
    with pytest.raises(ValueError, match=f"page.md:1: .*{words}|page.md:2: .*{words}"):
        regenerate.find_blocks(text, Path("page.md"))


def test_normalize_ignores_trailing_spaces_and_blank_lines_but_keeps_indentation():
    assert regenerate.normalize("  a  \n b\t\n\n\n") == "  a\n b"
    assert regenerate.normalize("\n\n") == ""


def test_replace_blocks_rewrites_only_the_given_blocks():
    first, second = regenerate.find_blocks(PAGE)
    new = regenerate.replace_blocks(PAGE, {second.start: "x\ny"})
    assert new.split("\n")[second.start:second.start + 3] == ["x", "y", "~~~"]
    assert [b.content for b in regenerate.find_blocks(new)] == ["one\ntwo", "x\ny"]
    assert regenerate.replace_blocks(PAGE, {}) == PAGE
    emptied = regenerate.replace_blocks(PAGE, {first.start: ""})
    assert regenerate.find_blocks(emptied)[0].content == ""


def test_diff_is_empty_when_the_output_matches_and_names_the_block_otherwise():
    first, _ = regenerate.find_blocks(PAGE, Path("page.md"))
    assert regenerate.block_diff(first, "one  \ntwo\n\n") == ""
    diff = regenerate.block_diff(first, "one\nthree")
    assert "page.md:3" in diff and "-two" in diff and "+three" in diff


def test_check_lists_what_differs_and_write_fixes_it(tmp_path):
    root = write_repo(tmp_path, PAGE, "<!-- regenerate: echo fine -->\n```\nfine\n```\n")
    out = io.StringIO()
    assert regenerate.regenerate(root, out=out) == 1
    assert "README.md:20: differs from `printf 'x'`" in out.getvalue() and "+x" in out.getvalue()
    assert "3 marked blocks, 1 differ" in out.getvalue()
    assert regenerate.main(["--check", "--root", str(root)]) == 1
    assert regenerate.main(["--write", "--root", str(root)]) == 0
    assert [b.content for b in regenerate.find_blocks((root / "README.md").read_text())] == ["one\ntwo", "x"]
    assert "Some prose." in (root / "README.md").read_text()
    assert regenerate.main(["--check", "--root", str(root)]) == 0


def test_a_failing_command_fails_the_check_and_is_never_written(tmp_path):
    readme = "<!-- regenerate: echo partial; exit 3 -->\n```\nkept\n```\n"
    root = write_repo(tmp_path, readme)
    out = io.StringIO()
    assert regenerate.regenerate(root, write=True, out=out) == 1
    assert "exited with 3" in out.getvalue()
    assert (root / "README.md").read_text() == readme


def test_commands_run_from_the_root_with_the_venv_first_on_path_and_no_network(tmp_path):
    env = regenerate.environment(tmp_path, str(tmp_path / "hf"))
    assert env["PATH"].startswith(str(tmp_path / ".venv" / "bin"))
    assert env["HF_HUB_OFFLINE"] == "1" and env["COLUMNS"] == "80" and env["HF_HOME"] == str(tmp_path / "hf")
    assert Path(regenerate.run_command("pwd", tmp_path, env)).resolve() == tmp_path.resolve()


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_links_between_pages_point_to_files_and_headings_that_exist():
    pages = regenerate.pages(REPO)
    assert REPO / "docs" / "configuration.md" in pages
    anchors = {p: {slug(h) for h in re.findall(r"^#{1,6} (.+)$", p.read_text(), flags=re.M)} for p in pages}
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            missing_anchor = anchor and path.suffix == ".md" and anchor not in anchors.get(path, set())
            if not path.exists() or missing_anchor:
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken


@pytest.mark.slow
def test_every_marked_block_is_what_its_command_prints():
    # The marked commands take seconds each (help texts, `osp plan`, `osp bench sweep --dry-run`).
    out = io.StringIO()
    bad = regenerate.regenerate(REPO, out=out)
    assert bad == 0, out.getvalue()
    assert regenerate.find_blocks((REPO / "README.md").read_text()), "the README keeps a marked block"
