"""The docs site and the README stay whole: every public name has an API entry, every page is in the
nav, the README stays short and its test command is the one CI runs. Reads files only (no build: CI
runs ``mkdocs build --strict``, which fails on a directive that names no object or a broken link)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import triton_ema
from triton_ema import export, migrate, posthoc, schedules

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
INTEGRATIONS = ROOT / "triton_ema" / "integrations"


def _module_all(path: Path) -> list[str]:
    """A module's ``__all__``, read from its source: the integrations import their frameworks."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"{path} has no __all__")


def _documented() -> set[str]:
    """Every object the API pages render: each ``::: path`` directive, and each name of its ``members:``."""
    names: set[str] = set()
    for page in sorted((DOCS / "api").glob("*.md")):
        directive = None
        in_members = False
        for line in page.read_text().splitlines():
            inline = re.match(r"\s+members:\s*\[(.*)\]\s*$", line)
            item = re.match(r"\s+- (\w+)\s*$", line)
            if line.startswith("::: "):
                directive = line[4:].strip()
                names.add(directive)
                in_members = False
            elif directive and inline:
                names.update(f"{directive}.{m.strip()}" for m in inline.group(1).split(",") if m.strip())
            elif directive and re.match(r"\s+members:\s*$", line):
                in_members = True
            elif in_members and item:
                names.add(f"{directive}.{item.group(1)}")
            elif line.strip() and not line.startswith(" "):
                in_members = False
    return names


def _public_api() -> list[str]:
    out = [f"triton_ema.{name}" for name in triton_ema.__all__ if name not in ("schedules", "posthoc")]
    for module in (schedules, posthoc, migrate, export):
        out += [f"{module.__name__}.{name}" for name in module.__all__]
    for path in sorted(INTEGRATIONS.glob("*.py")):
        if path.name != "__init__.py":
            out += [f"triton_ema.integrations.{path.stem}.{name}" for name in _module_all(path)]
    return out


@pytest.mark.parametrize("name", _public_api())
def test_public_name_in_api_pages(name):
    assert name in _documented(), f"{name} is public but no page under docs/api/ renders it"


def test_public_methods_of_ema_optimizer_in_api_pages():
    documented = _documented()
    shared = {"param_groups", "state", "defaults"}  # the wrapped optimizer's own, named in the class docstring
    ours = [c for c in triton_ema.EMAOptimizer.__mro__ if c.__module__.startswith("triton_ema")]  # its front end too
    internal = {"run_from", "core"}  # what attach() and the front end use, not the user
    public = sorted({n for c in ours for n, v in vars(c).items() if not n.startswith("_") and n not in shared | internal
                     and (callable(v) or isinstance(v, property))})
    attributes = (triton_ema.EMAOptimizer.__doc__ or "").split("Attributes:", 1)[-1].split("Raises:", 1)[0]
    missing = [n for n in public if f"triton_ema.EMAOptimizer.{n}" not in documented
               and not re.search(rf"^\s+{n}:", attributes, re.M)]
    assert not missing, (f"EMAOptimizer's public {missing} are neither in docs/api/optimizer.md's members nor in "
                         "the Attributes of its class docstring")


def test_every_public_name_has_a_docstring_listing_its_arguments():
    """``help()`` and the API pages show every argument: each documented callable's own arguments appear in
    its docstring's Args section (a class: its constructor's)."""
    import inspect

    checked = 0
    for name in _public_api():
        module_name, _, attr = name.rpartition(".")
        if module_name.startswith("triton_ema.integrations"):
            continue  # their modules import the frameworks; griffe checks them in the docs build
        obj = getattr(__import__(module_name, fromlist=[attr]), attr)
        if not callable(obj) or name.endswith("Schedule"):
            continue
        doc = inspect.getdoc(obj) or ""
        target = obj.__init__ if inspect.isclass(obj) else obj
        params = [p for p in inspect.signature(target).parameters if p not in ("self", "args", "kwargs")]
        if inspect.isclass(obj) and target is object.__init__:
            continue
        missing = [p for p in params if not re.search(rf"^\s+\**{p}( \(.*\))?:", doc, re.M)]
        assert not missing, f"{name}: arguments {missing} are not in its docstring's Args"
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("path", sorted(p for p in INTEGRATIONS.glob("*.py") if p.name != "__init__.py"), ids=lambda p: p.stem)
def test_integration_arguments_in_their_docstrings(path):
    """The same for the integrations' classes and functions, read from their source (importing them imports
    the frameworks)."""
    tree = ast.parse(path.read_text())
    public = set(_module_all(path))
    objects = [node for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in public]
    assert objects, f"{path.name}: no public class or function found"
    for cls in objects:
        doc = ast.get_docstring(cls) or ""
        init = cls if isinstance(cls, ast.FunctionDef) else next(
            (n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if init is None:
            assert doc, f"{cls.name} has no docstring"
            continue
        args = [a.arg for a in init.args.args + init.args.kwonlyargs if a.arg != "self"]
        args += [f"*{init.args.vararg.arg}"] if init.args.vararg else []
        args += [f"**{init.args.kwarg.arg}"] if init.args.kwarg else []
        missing = [a for a in args if not re.search(rf"^\s+{re.escape(a)}( \(.*\))?:", doc, re.M)]
        assert not missing, f"{cls.name}: arguments {missing} are not in its docstring's Args"


def test_every_docs_page_is_in_the_nav():
    config = (ROOT / "mkdocs.yml").read_text()
    nav = set(re.findall(r"^\s+(?:- )?[^:\n]+:\s*([\w/.-]+\.md)\s*$", config.split("\nnav:", 1)[1], re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages - nav == set(), f"pages missing from mkdocs.yml's nav: {sorted(pages - nav)}"
    assert nav - pages == set(), f"nav entries without a page: {sorted(nav - pages)}"


def test_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    lines = readme.count("\n")
    assert lines <= 200, f"README.md has {lines} lines; keep it under about 200 and move the rest to docs/"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        if not re.match(r"[a-z]+://", target):
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def _readme_block(heading: str) -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split(f"\n## {heading}\n", 1)[1]
    return re.search(r"```bash\n(.*?)\n```", section, re.S).group(1).strip()


def test_readme_test_command_is_what_ci_runs():
    command = _readme_block("Set up and test")
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert command in ci, f".ci/run does not run the README's test command:\n{command}"
    assert "mypy" in command and "mkdocs build --strict" in command and "python -m pytest" in command


def test_readme_demo_command_runs_the_demo():
    assert _readme_block("Try it: one command").endswith('-e ".[demo]" && python -m triton_ema.demo')
