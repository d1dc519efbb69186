"""The README and the guide in docs/: every shell block names files, flags and subcommands that exist
(`bash` blocks hold offline commands, `sh` blocks need the network or a GPU; both are checked without running);
`python` blocks import what exists; every link between the pages leads somewhere; every subcommand and
every train.py flag is documented somewhere."""

from __future__ import annotations

import argparse
import configparser
import itertools
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from atlas_vla.cli import build_parser, parse_args
from atlas_vla.config import FLAG_ALIASES, parse_overrides

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TEXT = {page: page.read_text() for page in PAGES}
PRODUCED = ("outputs/", "data/", "logs/", "stats.json")  # written by the commands before them (demo, generator)


def blocks(language: str, pages: list[Path] = PAGES) -> list[str]:
    return [block for page in pages for block in re.findall(rf"```{language}\n(.*?)```", TEXT[page], flags=re.S)]


def commands() -> list[list[str]]:
    found = []
    for block in blocks("bash") + blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                for part in line.split("&&"):
                    words = shlex.split(part)
                    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                        words = words[1:]  # environment assignments
                    if words:
                        found.append(words)
    return found


def check_path(path: str) -> None:
    if not path.startswith(PRODUCED):
        assert (REPO / path).exists(), f"the guide names {path}, which does not exist"


def check_train_args(args: list[str]) -> None:
    config, _ = parse_overrides(args)  # unknown flags or keys raise
    if config:
        check_path(config)


def check(words: list[str]) -> None:
    if words[:2] == ["pip", "install"]:
        extras = configparser.ConfigParser()
        extras.read(REPO / "setup.cfg")
        known = set(extras["options.extras_require"])
        for flag, value in itertools.pairwise(words):
            if flag == "-c":  # a constraints file
                check_path(value)
        for word in words[2:]:
            if word.startswith("-e"):
                continue
            match = re.fullmatch(r"\.\[(.*)\]", word.strip('"'))
            if match:
                assert set(match.group(1).split(",")) <= known, word
        return
    if words[:2] == ["accelerate", "launch"] and "-m" in words:  # a module run by every process
        module = words.index("-m") + 1
        assert words[module] == "atlas_vla.cli", f"the guide launches an unknown module: {' '.join(words)}"
        check(["atlas-vla", *words[module + 1:]])
        return
    if words[:2] == ["accelerate", "launch"]:
        index = words.index("train.py")
        check_path("train.py")
        check_train_args(words[index + 1:])
        return
    if words[:2] == ["python", "train.py"]:
        check_train_args(words[2:])
        return
    if words[0] == "./launch.sh":
        result = subprocess.run(["./launch.sh", "--dry-run", *words[1:]], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return
    if words[:3] == ["python", "-m", "pytest"] or words[:2] == ["accelerate", "config"]:
        return
    if words[0] == "srun":  # a SLURM job step runs the rest of the line
        check(words[1:])
        return
    if words[0] in ("[", "scontrol"):  # the SLURM recipe's requeue line
        return
    if words[:2] == ["wandb", "sweep"]:
        check_path(words[2])
        return
    if words[:2] == ["wandb", "agent"]:
        return
    if words[:2] == ["wandb", "sync"]:  # an offline run's folder, written by a command before it
        for word in words[2:]:
            check_path(word)
        return
    if words[0] == "python" and words[1].startswith("benchmarks/"):
        check_path(words[1])
        return
    if words[0] == "atlas-vla":
        try:
            args = parse_args(words[1:])
        except SystemExit as error:
            pytest.fail(f"the guide's command does not parse: {' '.join(words)} ({error})")
        parse_overrides(getattr(args, "_train_overrides", []))  # train.py's overrides: unknown keys raise
        for word in words[1:]:
            if word.startswith(("configs/", "notebooks/", "benchmarks/")):
                check_path(word)
        return
    pytest.fail(f"the guide has a runnable command this test does not know: {' '.join(words)}")


@pytest.mark.parametrize("words", commands(), ids=lambda w: " ".join(w)[:60])
def test_readme_command(words):
    check(words)


def test_the_two_commands_are_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text()
    first = blocks("bash", [REPO / "README.md"])[0]
    for line in first.splitlines():
        if line.strip() and not line.startswith("#"):
            assert line.split(" #")[0].strip() in ci, line


def test_python_blocks_import_what_exists():
    for block in blocks("python"):
        for line in block.splitlines():
            if line.startswith(("from atlas_vla", "import atlas_vla")):
                exec(line, {})


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_link_leads_somewhere(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", TEXT[page]):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor:
            prose = re.sub(r"```.*?```", "", resolved.read_text(), flags=re.S)  # a `#` comment is no heading
            headings = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
                        for h in re.findall(r"^#+ (.+)$", prose, flags=re.M)}
            assert anchor in headings, f"{page.name} links to {target}: no such heading"


def test_the_readme_is_a_front_door_to_every_page():
    readme = TEXT[REPO / "README.md"]
    assert len(readme.splitlines()) <= 250
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"the README's map of the guide does not link docs/{page.name}"


def test_every_subcommand_and_flag_is_documented():
    guide = "\n".join(TEXT.values())
    shown = "\n".join(blocks("bash") + blocks("sh"))
    subcommands = next(action.choices for action in build_parser()._actions
                       if isinstance(action, argparse._SubParsersAction))
    assert [name for name in subcommands if not re.search(rf"atlas-vla {name}\b", shown)] == [], \
        "subcommands that no command block of the guide shows"
    assert [flag for flag in FLAG_ALIASES if not re.search(rf"--{flag}\b", guide)] == [], "train.py flags no page names"
