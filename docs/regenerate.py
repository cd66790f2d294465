"""Rerun the commands behind the marked output blocks of README.md and docs/*.md, and compare or rewrite them.

A block is marked by an HTML comment on the line right before its opening fence:

    <!-- regenerate: osp plan recipe=osp_1p4b trainer=fsdp --gpus-per-node 8 --gpu h100 -->
    ```
    plan: osp_1p4b on 8 x H100 (fsdp2, bf16-mixed)
    ...
    ```

The command runs with bash from the repository root, with `.venv/bin/` first on PATH, offline, with an empty
Hugging Face cache and 80 columns (so that its output is the same on every machine); its stdout is the block.
Trailing spaces and trailing blank lines do not count.

    .venv/bin/python docs/regenerate.py --check    # exit 1 listing the blocks that differ (with a diff)
    .venv/bin/python docs/regenerate.py --write    # rewrite them
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^ {0,3}<!--\s*regenerate:\s*(?P<command>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
TIMEOUT_S = 120


@dataclass(frozen=True)
class Block:
    """A marked output block: `start` is the index of its first content line, `end` of its closing fence."""

    path: Path
    marker_line: int  # 1-based line number of the marker comment
    command: str
    start: int
    end: int
    content: str


def find_blocks(text: str, path: Path = Path("<text>")) -> list[Block]:
    """The marked blocks of a Markdown text, in order. A marker inside a fenced or indented code block is
    text, not a marker. A marker not followed by a fence on the next line, or a fence that is never closed,
    is a ValueError naming the line."""
    lines = text.split("\n")
    blocks = []
    i = 0
    while i < len(lines):
        marker = MARKER.match(lines[i])
        opening = FENCE.match(lines[i]) if marker is None else None
        if opening is not None:  # an unmarked fenced block: skip it whole
            end = _closing(lines, i)
            i = len(lines) if end is None else end + 1
            continue
        if marker is None:
            i += 1
            continue
        command = marker.group("command")
        if not command:
            raise ValueError(f"{path}:{i + 1}: regenerate marker without a command")
        if i + 1 >= len(lines) or FENCE.match(lines[i + 1]) is None:
            raise ValueError(f"{path}:{i + 1}: regenerate marker not followed by a fence on the next line")
        end = _closing(lines, i + 1)
        if end is None:
            raise ValueError(f"{path}:{i + 2}: the fenced block after the regenerate marker is never closed")
        blocks.append(Block(path, i + 1, command, i + 2, end, "\n".join(lines[i + 2:end])))
        i = end + 1
    return blocks


def _closing(lines: list[str], opening: int) -> int | None:
    """The index of the fence that closes the one opened at `lines[opening]` (None: never closed)."""
    fence = FENCE.match(lines[opening]).group("fence")  # type: ignore[union-attr]
    closing = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
    return next((j for j in range(opening + 1, len(lines)) if closing.match(lines[j])), None)


def normalize(output: str) -> str:
    """Text as a block holds it: no trailing spaces on a line, no blank lines at the end."""
    return "\n".join(line.rstrip() for line in output.rstrip().split("\n")) if output.strip() else ""


def replace_blocks(text: str, new_contents: dict[int, str]) -> str:
    """`text` with the content of the blocks starting at the given line indices replaced."""
    lines = text.split("\n")
    for block in sorted(find_blocks(text), key=lambda b: b.start, reverse=True):
        if block.start in new_contents:
            new = new_contents[block.start]
            lines[block.start:block.end] = new.split("\n") if new else []
    return "\n".join(lines)


def block_diff(block: Block, output: str, root: Path = REPO) -> str:
    """A unified diff from the block's content to the command's (normalized) output; empty when they agree."""
    where = os.path.relpath(block.path, root) if block.path.is_absolute() else str(block.path)
    return "".join(difflib.unified_diff(
        [line + "\n" for line in normalize(block.content).split("\n")],
        [line + "\n" for line in normalize(output).split("\n")],
        fromfile=f"{where}:{block.marker_line} (in the page)", tofile=f"$ {block.command}"))


def environment(root: Path, hf_home: str) -> dict[str, str]:
    """The environment of a command: the repo's venv first on PATH, no network, a fixed terminal width."""
    env = dict(os.environ)
    env["PATH"] = f"{root / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update({"COLUMNS": "80", "LINES": "24", "HF_HOME": hf_home, "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
                "PYTHONWARNINGS": "ignore"})
    env.pop("HF_HUB_CACHE", None)
    env.pop("TRANSFORMERS_CACHE", None)
    return env


def run_command(command: str, root: Path, env: dict[str, str]) -> str:
    """The command's stdout (normalized); a RuntimeError with its stderr when it fails or hangs."""
    try:
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=root, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"`{command}` did not finish within {TIMEOUT_S} s") from None
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"`{command}` exited with {proc.returncode}:\n{tail}")
    return normalize(proc.stdout)


def pages(root: Path) -> list[Path]:
    """README.md and docs/*.md."""
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def regenerate(root: Path = REPO, write: bool = False, jobs: int = 2, out: TextIO | None = None) -> int:
    """Check (or rewrite) every marked block under `root`; returns how many blocks differ or fail."""
    out = out or sys.stdout
    jobs = max(1, jobs)
    blocks = {path: find_blocks(path.read_text(encoding="utf-8"), path) for path in pages(root)}
    todo = [block for found in blocks.values() for block in found]
    # Every command sees the same fresh, empty Hugging Face home.
    with tempfile.TemporaryDirectory(prefix="osp-regenerate-") as hf_home, ThreadPoolExecutor(jobs) as pool:
        env = environment(root, hf_home)

        def attempt(block: Block) -> tuple[str | None, str | None]:
            try:
                return run_command(block.command, root, env), None
            except RuntimeError as err:
                return None, str(err)

        results = dict(zip(todo, pool.map(attempt, todo)))
    bad = 0
    for path, found in blocks.items():
        new_contents = {}
        for block in found:
            output, error = results[block]
            where = f"{os.path.relpath(path, root)}:{block.marker_line}"
            if error is not None:
                bad += 1
                print(f"{where}: error: {error}", file=out)
                continue
            if normalize(block.content) == output:
                continue
            if write:
                new_contents[block.start] = output
                print(f"{where}: rewritten from `{block.command}`", file=out)
            else:
                bad += 1
                print(f"{where}: differs from `{block.command}`", file=out)
                print(block_diff(block, output, root), file=out)
        if new_contents:
            path.write_text(replace_blocks(path.read_text(encoding="utf-8"), new_contents), encoding="utf-8")
    if not write:
        print(f"regenerate: {len(todo)} marked blocks, {bad} differ or fail", file=out)
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="docs/regenerate.py", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="compare each block with its command's output")
    mode.add_argument("--write", action="store_true", help="rewrite the blocks that differ")
    parser.add_argument("--root", type=Path, default=REPO, help="repository root (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="commands run at the same time (default: 2)")
    args = parser.parse_args(argv)
    try:
        bad = regenerate(args.root.resolve(), write=args.write, jobs=args.jobs)
    except ValueError as err:
        print(f"regenerate: error: {err}", file=sys.stderr)
        return 2
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
