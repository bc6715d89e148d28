"""The package's boundaries: every module of the package and of the model runtime declares its interface in
`__all__` (names it defines or imports), and the README takes the documented API from the package, never from a
command-line module."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "diffuapriel_hf"
# The shipped model's folder holds links to modeling/'s files: they are checked there.
MODULES = sorted(p for p in [*PACKAGE.rglob("*.py"), *(ROOT / "modeling").rglob("*.py")]
                 if "default_model" not in p.relative_to(ROOT).parts)


def top_level_names(tree: ast.Module) -> set[str]:
    """The names a module defines at its top level, and those it imports anywhere (an import may sit in a `try`)."""
    names = {(alias.asname or alias.name).split(".")[0] for node in ast.walk(tree)
             if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        names |= {target.id for target in targets if isinstance(target, ast.Name)}
    return names


def declared_api(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return ast.literal_eval(node.value)
    return None


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_declares_all_of_names_it_defines(path):
    tree = ast.parse(path.read_text())
    api = declared_api(tree)
    assert api is not None, f"{path.relative_to(ROOT)} has no __all__"
    undefined = sorted(set(api) - top_level_names(tree))
    assert not undefined, f"{path.relative_to(ROOT)}'s __all__ names what it does not define: {undefined}"
    assert len(set(api)) == len(api)


def test_the_check_finds_a_module_without_all_and_a_name_it_lacks():
    assert declared_api(ast.parse("def f():\n    pass\n")) is None
    tree = ast.parse("from x import y\n__all__ = ['y', 'z']\n")
    assert set(declared_api(tree)) - top_level_names(tree) == {"z"}


def test_readme_imports_the_api_from_the_package_not_the_command_line():
    imports = re.findall(r"^\s*(?:from|import) (diffuapriel_hf[\w.]*)", (ROOT / "README.md").read_text(), re.M)
    assert "diffuapriel_hf" in imports
    assert not [name for name in imports if name.startswith("diffuapriel_hf.cli")]
