"""The documentation cannot drift from the code: every `python train.py ...` command in README.md and docs/*.md
composes and passes the start-up check, every error line shown under such a command is the one the check prints,
every relative link points at a file, and the README stays a front door (at most 250 lines)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from epi.config import validate
from epi.data.load import known_tasks
from epi.data.local import expand_root
from epi.errors import UserError
from tests.helpers import ROOT, make_cfg

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250

# Commands that cannot be checked here, by the text of their overrides (after train.py), with the reason. Keep it
# small and true: everything else must compose and validate as written.
SKIP = {
    "data=local data.root=/path/to/tasks": "needs a folder of task folders (tests/test_local_data.py runs one)",
    "data=local data.root=/path/to/tasks 'data.tasks=[qa,chat]'": "needs a folder of task folders (tests/test_local_data.py runs one)",
    "--config-dir ~/my_conf data=mine": "needs the reader's own config directory (tests/test_local_data.py runs the example)",
    "'hydra.searchpath=[file:///home/me/my_conf]' data=mine": "needs the reader's own config directory (as above)",
    "[group=option ...] [key=value ...]": "the command's synopsis, not a command",
    "<same overrides> resume=outputs/2026-11-23/10-00-00 hydra.run.dir=outputs/2026-11-23/10-00-00":
        "a template: the reader's own overrides go in <same overrides>",
    "strategy=headlock strategy.side=train": "the walk-through's strategy exists only once written (tests/test_new_strategy.py runs it)",
}
# $OVERRIDES stands for what `python -m tests.paper_files <dir>` prints: the test writes those files and fills it in.
NEEDS_PAPER_FILES = "$OVERRIDES"
# `$ python train.py ...` examples whose `error:` line comes from the run itself, not from the start-up check: they
# must compose and validate; the error is tested where it is raised (named here).
RUNTIME_ERRORS = {
    "strategy=none optimizer.lr=1e4 schedule.checkpoint_every=1": "divergence at step 4 (tests/test_errors.py)",
}

# Inline examples the prose shows failing at the start-up check, with the start of the line they print.
INLINE_ERRORS = {
    "+optimizer.momentm=0.9": "error: optimizer: unknown key(s) ['momentm'] for torch.optim.AdamW; valid keys: [",
}


@dataclass
class Command:
    page: str
    line: int
    text: str  # the overrides as written, after train.py
    args: list[str]
    error: str | None  # the `error:` line shown under a `$ python train.py ...` example


def code_blocks(text: str):
    """(first line number, lines) of each fenced code block."""
    block, start = None, 0
    for i, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            if block is None:
                block, start = [], i + 1
            else:
                yield start, block
                block = None
        elif block is not None:
            block.append(line)


def logical_lines(start: int, lines: list[str]):
    """Lines joined across `\\` continuations: (line number of the first, text)."""
    buf, first = "", start
    for i, line in enumerate(lines, start):
        if not buf:
            first = i
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        yield first, buf + line
        buf = ""
    if buf:
        yield first, buf


def train_args(line: str) -> tuple[str, list[str]] | None:
    """The overrides a line gives train.py (after `python`, `torchrun ...` or `srun ...`), or None."""
    text = line.strip().removeprefix("$ ")
    if "train.py" not in text:
        return None
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError:
        return None
    if "train.py" not in tokens:
        return None
    at = tokens.index("train.py")
    launcher = tokens[0] if at else ""
    if not (launcher.startswith("python") or launcher in ("torchrun", "srun", "sbatch")):
        return None
    args = []
    for tok in tokens[at + 1 :]:
        if tok in ("&&", "||", ";", "|"):
            break
        args.append(tok)
    raw = text[text.index("train.py") + len("train.py") :]
    raw = re.split(r"\s(?:&&|\|\||;)\s|\s+#", raw)[0].strip()
    return raw, args


def commands() -> list[Command]:
    out = []
    for page in PAGES:
        rel = page.relative_to(ROOT).as_posix()
        for start, block in code_blocks(page.read_text()):
            logical = list(logical_lines(start, block))
            for k, (line_no, line) in enumerate(logical):
                found = train_args(line)
                if found is None:
                    continue
                error = None
                if line.strip().startswith("$ ") and k + 1 < len(logical) and logical[k + 1][1].startswith("error: "):
                    error = logical[k + 1][1]
                out.append(Command(rel, line_no, found[0], found[1], error))
        # Inline `python train.py ...` spans of the prose (a span may wrap across lines), code blocks blanked out.
        prose = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), page.read_text(), flags=re.S)
        for m in re.finditer(r"`((?:python|torchrun)[^`]*?train\.py[^`]*)`", prose):
            found = train_args(" ".join(m.group(1).split()))
            if found is not None and found[1]:
                line_no = prose.count("\n", 0, m.start()) + 1
                out.append(Command(rel, line_no, found[0], found[1], INLINE_ERRORS.get(found[0])))
    return out


def first_of_each_sweep(args: list[str]) -> list[str]:
    """A sweep's first job: `key=a,b` -> `key=a` (Hydra's own parser, so `pair=[a,b],[c,d]` -> `pair=[a,b]`)."""
    parser = OverridesParser.create()
    out = []
    for arg in args:
        (override,) = parser.parse_overrides([arg])
        if override.is_sweep_override():
            arg = f"{override.get_key_element()}={next(override.sweep_string_iterator())}"
        out.append(arg)
    return out


def overrides_of(cmd: Command, tmp: Path) -> list[str]:
    args = [a for a in cmd.args if a not in ("-m", "--multirun", "...")]
    args = [re.sub(r"<s>", "0", a) for a in args]
    args = [re.sub(r"<[^>]+>", "placeholder", a) for a in args]
    if NEEDS_PAPER_FILES in args:
        from tests.paper_files import write_paper_files

        at = args.index(NEEDS_PAPER_FILES)
        args[at : at + 1] = write_paper_files(tmp)
    return first_of_each_sweep(args)


def check(overrides: list[str]) -> None:
    cfg = make_cfg(*overrides, tiny=False)
    cfg.data = expand_root(cfg.data)
    validate(cfg, known_tasks(cfg.data))


ALL = commands()


def test_the_pages_show_train_commands() -> None:
    """The parser finds what it is meant to (a broken parser would make every check below pass vacuously)."""
    assert len(ALL) >= 30
    assert any(c.error for c in ALL)
    assert {c.page for c in ALL} >= {"README.md", "docs/configuration.md", "docs/experiments.md"}


@pytest.mark.parametrize("cmd", ALL, ids=[f"{c.page}:{c.line}" for c in ALL])
def test_every_documented_train_command_composes_and_validates(cmd: Command, tmp_path: Path) -> None:
    if cmd.text in SKIP:
        pytest.skip(SKIP[cmd.text])
    overrides = overrides_of(cmd, tmp_path)
    if cmd.error is None or cmd.text in RUNTIME_ERRORS:
        check(overrides)
        return
    with pytest.raises(UserError) as caught:
        check(overrides)
    if cmd.text in INLINE_ERRORS:  # the prose abridges the line
        assert f"error: {caught.value}".startswith(cmd.error)
    else:
        assert f"error: {caught.value}" == cmd.error


def test_the_allow_lists_name_only_documented_commands() -> None:
    texts = {c.text for c in ALL}
    assert set(SKIP) <= texts, set(SKIP) - texts
    assert set(RUNTIME_ERRORS) <= texts, set(RUNTIME_ERRORS) - texts
    assert set(INLINE_ERRORS) <= texts, set(INLINE_ERRORS) - texts


def test_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_relative_link_points_at_a_file(page: Path) -> None:
    missing = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = target.split("#")[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)}: links to missing files: {missing}"
