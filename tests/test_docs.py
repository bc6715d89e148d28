"""The repository's own documents: docs/architecture.md names files that exist, and the code cites no document
outside the repository."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "architecture.md"
SOURCE_FOLDERS = ("modeling", "src", "tests", "benchmarks", "conversion")
# A design page kept beside the repository, cited by section number (spelled in two parts so this file does not match).
OUTSIDE_CITATION = re.compile("DESIGN" + r"( section|\.md)")


def source_files():
    for folder in SOURCE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".md", ".sh") and path.resolve() != Path(__file__).resolve():
                yield path


def test_code_cites_only_documents_in_the_repository():
    citing = [str(path.relative_to(ROOT)) for path in source_files() if OUTSIDE_CITATION.search(path.read_text())]
    assert not citing, f"these files cite a document that is not in the repository: {citing}"


def layout_paths(text: str) -> list[str]:
    """The files and folders of the layout block under docs/architecture.md's "Where things live": a name at the start
    of a line is a path from the repository root, a name indented by two spaces is inside the last such folder, and
    lines indented further continue a description."""
    block = text.split("## Where things live", 1)[1].split("```", 2)[1]
    paths, folder = [], ""
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        if not line.strip() or indent > 2:
            continue
        name = line.split()[0]
        if indent:
            paths.append(folder + name)
        else:
            paths.append(name)
            folder = name if name.endswith("/") else ""
    return paths


def test_architecture_layout_names_real_paths():
    paths = layout_paths(ARCHITECTURE.read_text())
    assert len(paths) > 10
    missing = [path for path in paths if not (ROOT / path).exists()]
    assert not missing, f"docs/architecture.md's layout names paths that do not exist (update it): {missing}"


def test_architecture_cites_real_files():
    cited = set(re.findall(r"`((?:modeling|src|tests|benchmarks|conversion|docs)/[\w./-]+)`", ARCHITECTURE.read_text()))
    assert cited
    missing = sorted(path for path in cited if not (ROOT / path).exists())
    assert not missing, f"docs/architecture.md cites files that do not exist (update it): {missing}"


def test_cited_benchmark_results_exist():
    """Paths under benchmarks/results/ that the README and the code cite (a stem stands for its .json and .md), but
    where a command writes them (`--out PATH`); the results' own narrative is left out: it also tells of results
    retired to git history."""
    results = ROOT / "benchmarks" / "results"
    cited = {}
    for path in [ROOT / "README.md", *source_files()]:
        if results in path.parents:
            continue
        for name in re.findall(r"(?<!--out )benchmarks/results/[\w.*/-]*\w", path.read_text()):
            cited.setdefault(name, path.relative_to(ROOT))
    assert cited
    missing = {name: str(where) for name, where in cited.items() if not list(ROOT.glob(name + "*"))}
    assert not missing, f"cited result files that do not exist (moved to benchmarks/results/archive/?): {missing}"


def test_the_license_the_package_declares_is_in_the_repository():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = {text = "Apache-2.0"}' in pyproject
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text and "APPENDIX: How to apply the Apache License" in license_text
