"""The Python standard library's own source as a corpus: present on every machine that runs Python, so the default
model trains and evaluates on the same kind of text everywhere.

Files are the `.py` files under the running interpreter's stdlib folder, in sorted order of their path relative to it
(a fixed, documented order). Left out: `site-packages`, the test suites (`test/`, `*/tests/`, `idlelib/idle_test/`;
they hold deliberately broken files), and files that are not UTF-8. The held-out split is every file of the modules
named in `HELD_OUT_MODULES`, never trained on.

    python -m diffuapriel_hf.training.stdlib_corpus train     # prints the training files, one per line
    python -m diffuapriel_hf.training.stdlib_corpus heldout
    python -m diffuapriel_hf.training.stdlib_corpus train 8   # the first 8 only
"""

import functools
import sys
import sysconfig
from pathlib import Path

__all__ = ["HELD_OUT_MODULES", "main", "stdlib_files", "stdlib_root", "top_level_module"]

# Top-level modules (a module file or a package) kept out of training; all exist in Python 3.10 to 3.13.
HELD_OUT_MODULES = (
    "bisect", "calendar", "colorsys", "csv", "difflib", "fnmatch", "fractions", "glob", "heapq", "json", "shlex",
    "statistics", "string", "textwrap",
)
EXCLUDED_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
SPLITS = ("train", "heldout")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def top_level_module(relative: Path) -> str:
    return relative.parts[0].removesuffix(".py")


def stdlib_files(split: str, root: Path | None = None) -> list[Path]:
    """The corpus files of `split` ("train" or "heldout"), sorted by path relative to the stdlib folder."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return list(_corpus_files(split, stdlib_root() if root is None else Path(root)))


@functools.lru_cache
def _corpus_files(split: str, root: Path) -> tuple[Path, ...]:
    # Kept for the process: finding the files reads all of them (to leave out those that are not UTF-8), several
    # seconds for the whole standard library, and training, evaluation and benchmarks ask again and again.
    files = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        relative = path.relative_to(root)
        if EXCLUDED_PARTS.intersection(relative.parts[:-1]) or relative.parts[0] in EXCLUDED_PARTS:
            continue
        if (top_level_module(relative) in HELD_OUT_MODULES) != (split == "heldout"):
            continue
        try:
            path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        files.append(path)
    if not files:
        raise ValueError(f"no standard library source files found under {root}")
    return tuple(files)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2) or argv[0] not in SPLITS or (len(argv) == 2 and not argv[1].isdigit()):
        print(f"usage: python -m diffuapriel_hf.training.stdlib_corpus {{{','.join(SPLITS)}}} [COUNT]", file=sys.stderr)
        return 2
    files = stdlib_files(argv[0])
    print("\n".join(str(path) for path in files[: int(argv[1]) if len(argv) == 2 else None]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
