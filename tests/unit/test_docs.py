"""The README and docs/ say only what exists: every command, option and config key they name is
in the code, every link stays in the repository, and CI runs the README's test command."""

import dataclasses
import pathlib
import re
import types
import typing

import pytest
import yaml

from orchestrator.cli import build_parser
from orchestrator.config.schema import JobConfig
from workers.merge import METHODS

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)


def _text(page: pathlib.Path) -> str:
    return page.read_text(encoding="utf-8")


def test_readme_is_a_front_door_whose_test_command_ci_runs():
    readme = _text(ROOT / "README.md")
    assert len(readme.splitlines()) <= 250
    commands = FENCE.search(readme).group(2).strip().splitlines()
    assert len(commands) == 2 and "raymerge demo" in commands[0]
    test_command = commands[1].split("#")[0].strip()
    assert test_command in _text(ROOT / ".ci" / "run")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_stay_in_the_repository(page):
    for target in re.findall(r"\]\(([^)]+)\)", _text(page)):
        path = target.split("#")[0]
        assert "://" not in target and "shared/" not in target, target
        assert not path or (page.parent / path).exists(), target
    assert "../shared" not in _text(page)


def _snippets(text: str) -> list[str]:
    """Every inline code span and every line of a fenced block."""
    inline = re.findall(r"`([^`\n]+)`", FENCE.sub("", text))
    fenced = [line for _, block in FENCE.findall(text) for line in block.splitlines()]
    return inline + fenced


def _subcommands() -> dict[str, set[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return {name: {o for a in p._actions for o in a.option_strings}
            for name, p in sub.choices.items()}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_and_option_named_exists(page):
    commands = _subcommands()
    for snippet in _snippets(_text(page)):
        for m in re.finditer(r"(?:^|[\s$(])raymerge ([a-z][a-z-]*)((?: +[^|#;]*)?)", snippet):
            name, rest = m.group(1), m.group(2)
            if name in ("demo",) and "raymerge-demo" in snippet:
                continue
            assert name in commands, f"{page.name}: `raymerge {name}`"
            for option in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", rest):
                assert option in commands[name], f"{page.name}: raymerge {name} {option}"


def _field_type(cls: type, name: str):
    hints = typing.get_type_hints(cls)
    if name not in hints:
        return None
    tp = hints[name]
    while typing.get_origin(tp) in (typing.Union, list, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
    return tp


def _params() -> set[str]:
    return {f.name for spec in METHODS.values() for f in dataclasses.fields(spec.params)}


def _check_path(parts: list[str], where: str) -> None:
    cls: typing.Any = JobConfig
    for i, part in enumerate(parts):
        if cls is dict or typing.get_origin(cls) is dict:  # method params
            assert part in _params(), f"{where}: no method has a parameter {part!r}"
            return
        if not dataclasses.is_dataclass(cls):
            raise AssertionError(f"{where}: {'.'.join(parts[:i])} has no keys")
        tp = _field_type(cls, part)
        assert tp is not None, f"{where}: {cls.__name__} has no key {part!r}"
        cls = tp


_TOP = {f.name for f in dataclasses.fields(JobConfig)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_config_key_named_exists(page):
    """Dotted keys in code spans (`runtime.worker_memory`, `sources[1].params.weight`,
    `merge.params.density=0.5`) and the keys of every native job YAML block (the mergekit page
    names mergekit's own keys too, so only its YAML blocks are checked there)."""
    for snippet in _snippets(_text(page)) if page.name != "mergekit.md" else []:
        for key in re.findall(r"(?<![\w./-])([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+(?:\[\d+\])?)+)",
                              snippet):
            parts = [re.sub(r"\[\d+\]$", "", p) for p in key.split(".")]
            if parts[0] in _TOP and not key.endswith((".py", ".json", ".yaml", ".md")):
                _check_path(parts, f"{page.name}: {key}")
    for lang, block in FENCE.findall(_text(page)):
        if lang != "yaml":
            continue
        doc = yaml.safe_load(block)
        if not isinstance(doc, dict) or "merge_method" in doc or "schedules" in doc:
            continue  # a mergekit config or a schedules file
        _check_doc(doc, JobConfig, page.name)


def _check_doc(doc: dict, cls: type, where: str) -> None:
    for key, value in doc.items():
        tp = _field_type(cls, key)
        assert tp is not None, f"{where}: {cls.__name__} has no key {key!r}"
        values = value if isinstance(value, list) else [value]
        if dataclasses.is_dataclass(tp):
            for v in values:
                if isinstance(v, dict):
                    _check_doc(v, tp, where)


def test_every_method_is_in_the_readme_table_and_the_methods_page():
    readme, page = _text(ROOT / "README.md"), _text(ROOT / "docs" / "methods.md")
    for name in METHODS:
        assert f"`{name}`" in readme and f"### `{name}`" in page, name
