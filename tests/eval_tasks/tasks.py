"""Local lm-evaluation-harness tasks over JSONL files beside this one, cut from the standard library's held-out modules
(never trained on by the shipped model), so that the suite runs lm-eval end to end offline:

- stdlib_next_line (multiple choice): a few lines of code, then the line that follows among three lines of other
  held-out files;
- stdlib_perplexity (loglikelihood_rolling): stretches of code, as perplexity tasks score documents;
- stdlib_complete_line (generate_until): a line's first half, to be completed up to the newline.

The YAML files load the data through `load` (`custom_dataset: !function tasks.load`), which reads the JSONL named by
the task's `dataset_kwargs` from this folder, wherever lm-eval runs. `python tests/eval_tasks/tasks.py` rewrote the
JSONL files (from the interpreter's standard library; the committed files came from Python 3.11).
"""

import json
import random
import sys
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(data_file: str, **metadata) -> datasets.DatasetDict:
    """The task's documents as its test split (lm-eval passes the task's `dataset_kwargs` and `--metadata`)."""
    with open(HERE / data_file, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def code_lines(draw: random.Random) -> list[list[str]]:
    """The held-out files' lines (newlines kept), in a shuffled order of files."""
    sys.path.insert(0, str(HERE.parents[1] / "src"))
    from diffuapriel_hf.training.stdlib_corpus import stdlib_files

    files = [path.read_text(encoding="utf-8").splitlines(keepends=True) for path in stdlib_files("heldout")]
    draw.shuffle(files)
    return files


def next_line_items(files: list, draw: random.Random, count: int) -> list[dict]:
    items = []
    while len(items) < count:
        lines = draw.choice(files)
        index = draw.randrange(4, len(lines))
        if not 12 <= len(lines[index].strip()) <= 60:
            continue
        # Lines of other files as long as the answer (within a quarter), so that length tells nothing.
        others = [line for line in (draw.choice(draw.choice(files)) for _ in range(2000))
                  if abs(len(line) - len(lines[index])) <= len(lines[index]) / 4 and line != lines[index]][:3]
        if len(others) < 3:
            continue
        answer = draw.randrange(4)
        choices = others[:answer] + [lines[index]] + others[answer:]
        items.append({"context": "".join(lines[index - 4 : index]), "choices": choices, "answer": answer})
    return items


def main() -> int:
    draw = random.Random(0)
    files = code_lines(draw)
    tasks = {"next_line.jsonl": next_line_items(files, draw, 16), "perplexity.jsonl": [], "complete_line.jsonl": []}
    while len(tasks["perplexity.jsonl"]) < 4:
        lines = draw.choice(files)
        start = draw.randrange(0, max(len(lines) - 12, 1))
        tasks["perplexity.jsonl"].append({"text": "".join(lines[start : start + 12])})
    while len(tasks["complete_line.jsonl"]) < 6:
        lines = draw.choice(files)
        index = draw.randrange(2, len(lines))
        line = lines[index].rstrip("\n")
        if len(line.strip()) < 20:
            continue
        half = len(line) // 2
        tasks["complete_line.jsonl"].append({"context": "".join(lines[index - 2 : index]) + line[:half],
                                             "target": line[half:]})
    for name, rows in tasks.items():
        (HERE / name).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
