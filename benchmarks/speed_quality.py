"""Speed against quality: what each decoding setting of `generate()` buys in tokens per forward pass and wall time, and
what it costs in accuracy, with the shipped model on the CPU over held-out standard-library code.

Tasks, on functions of the held-out modules (`HELD_OUT_MODULES` of training/stdlib_corpus.py: never trained on), each
with the tokens around it as context (`--left_tokens` before; for the fills also `--right_tokens` after):
- line: one line of a function's body masked (the middle statement of the body written on one line);
- body: the function's whole body masked (after its docstring);
- continuation: the function's header (and docstring) as the prompt, as many new tokens as its body has.
Scores: exact match (the generated text is the original), the span's tokens generated right (position by position) and
parsing (the function with the generated code parses as Python, dedented; a continuation may drop its last, possibly
cut, line). Doctests: where the function's docstring holds doctest examples that the original passes, the completed
function (the form that parses) replaces the original in its module and its examples run in a fenced subprocess
(`diffuapriel_hf.evaluation.doctests`: a timeout, resource limits, a fresh temporary folder); it passes only if all
of them pass. Few functions of the sample have such doctests, so this score also decodes a wider pool: up to
`--doctest_items` items a task from the held-out functions with passing doctests (spans of `--doctest_line_tokens` and
`--doctest_body_tokens`), each setting's pass rate over them and the sample's items with doctests, pooled.

Decoding settings (greedy, low-confidence remasking): one token per step; half the steps; Fast-dLLM's confidence
threshold at several values; the approximate block cache of the full-sequence model (one token per step, and with a
threshold); with --block_model, a trained block diffusion model with its exact cache (one token per step, and with
the same threshold). The continuation runs in blocks of `--block_length` (the block model: in its own blocks); a fill
is one block of its masks (the block model denoises the prompt's blocks that hold masks in turn). For each setting: tokens per forward
pass (generated tokens over forward passes, all items), the wall seconds of its `generate()` calls, the three scores
(each task's rate, and their mean over the tasks: the accuracy of that kind), the doctest pass rate with the tokens per
forward pass of the doctest items, and AUP (`diffuapriel_hf.evaluation.parallelism.accuracy_under_parallelism`) of the
setting's curve: its family's one token per step point (no cache, block cache, block model), then its own point; y_max
the best accuracy of all rows. Speed and the three scores are the sample's alone, as in the first run.

    python benchmarks/speed_quality.py --out benchmarks/results/speed_quality_cpu       # .json, .md and .png
    python benchmarks/speed_quality.py --smoke --out /tmp/speed_quality                 # one short item per task
"""

import argparse
import ast
import doctest
import functools
import json
import textwrap
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoTokenizer

from diffuapriel_hf import DiffuAprielForMaskedLM, default_model_path
from diffuapriel_hf.evaluation.doctests import DoctestOutcome, run_function_doctests
from diffuapriel_hf.evaluation.parallelism import accuracy_under_parallelism
from diffuapriel_hf.training.evaluation import complete_lines, parses
from diffuapriel_hf.training.stdlib_corpus import HELD_OUT_MODULES, stdlib_files, stdlib_root, top_level_module
from harness import new_result, save  # benchmarks/harness.py, beside this script

TASKS = ("line", "body", "continuation")
NO_CACHE, BLOCK_CACHE, BLOCK_MODEL = "no cache", "block cache", "block model"
# Each kind of accuracy and the per-task rate it averages.
KINDS = {"exact": "exact_rate", "tokens": "token_rate", "parses": "parse_rate"}
# Each accuracy's parallelism (tokens per forward pass): the sample's, or for doctests the doctest items'.
PARALLELISM = {**{kind: "tokens_per_forward" for kind in KINDS}, "doctests": "doctest_tokens_per_forward"}


@dataclass(frozen=True)
class CodeItem:
    """One task on one function. prompt_ids: the context with masks where the span was (fills), or the context up to
    the span (continuation); target: the span's original text, target_ids its tokens; before / after: the function's
    text before and after the span, which the generated text is put between to parse it; doctest_target: (the module
    to import, the function's qualified name) where its docstring holds doctest examples (and it is a top-level
    function or a method of a top-level class, which the doctest runner can replace)."""

    task: str
    module: str
    function: str
    prompt_ids: tuple[int, ...]
    target: str
    target_ids: tuple[int, ...]
    before: str
    after: str
    doctest_target: Optional[tuple[str, str]] = None

    @property
    def target_tokens(self) -> int:
        return len(self.target_ids)


def line_starts(source: str) -> list[int]:
    """The character offset of each line (index 1 for line 1, as `ast` counts), and one past the end. Lines end at
    "\n" alone, as `ast` counts them (`str.splitlines` also splits at form feeds, which some modules hold)."""
    starts, offset = [0, 0], 0
    for line in source.split("\n"):
        offset += len(line) + 1
        starts.append(offset)
    return starts


def function_spans(source: str):
    """For each function whose body starts on a line of its own: (node, {task: (first char, end char) of the span},
    (first char, end char) of the function from its `def`). The body is its lines after the docstring; the line is its
    middle statement written on one line (when it has one)."""
    tree, starts = ast.parse(source), line_starts(source)

    def line_end(number: int) -> int:  # the offset of the line's newline
        return starts[number + 1] - 1

    def own_line(node: ast.stmt) -> bool:  # nothing but indentation before the statement on its line
        return not source[starts[node.lineno] : starts[node.lineno] + node.col_offset].strip()

    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in sorted(functions, key=lambda n: n.lineno):
        body = node.body[1:] if ast.get_docstring(node) is not None else node.body
        if not body or body[0].lineno == node.lineno or not own_line(body[0]):
            continue
        spans = {"body": (starts[body[0].lineno], line_end(body[-1].end_lineno))}
        spans["continuation"] = spans["body"]
        one_line = [s for s in body if s.lineno == s.end_lineno and own_line(s)]
        if len(body) > 1 and one_line:  # a one-statement body would be the body task again
            middle = one_line[len(one_line) // 2]
            spans["line"] = (starts[middle.lineno], line_end(middle.lineno))
        yield node, spans, (starts[node.lineno], line_end(node.end_lineno))


def import_name(relative: Path) -> str:
    """The dotted name a standard-library file is imported by, from its path under the library's root."""
    parts = relative.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def doctest_functions(source: str) -> dict[int, str]:
    """{the `def` line: the qualified name} of the file's top-level functions and methods of its top-level classes
    whose docstrings hold doctest examples (as `doctest` parses them)."""
    parser, found, functions = doctest.DocTestParser(), {}, (ast.FunctionDef, ast.AsyncFunctionDef)
    for top in ast.parse(source).body:
        inside = top.body if isinstance(top, ast.ClassDef) else []
        named = [(f"{top.name}.{node.name}", node) for node in inside if isinstance(node, functions)]
        named += [(top.name, top)] if isinstance(top, functions) else []
        for name, node in named:
            docstring = ast.get_docstring(node)
            if docstring and parser.get_examples(docstring):
                found[node.lineno] = name
    return found


def module_items(source: str, module: str, tokenizer, task: str, token_range: tuple[int, int], left_tokens: int,
                 right_tokens: int, import_as: str) -> list[CodeItem]:
    """The items of `task` in one file (imported as `import_as`): spans of `token_range` tokens (inclusive), taken as
    whole tokens of the file's own tokenization (a token that crosses the span's edge stays in the context), the
    original text reproduced by decoding them."""
    encoding = tokenizer(source, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = encoding.input_ids, encoding.offset_mapping
    with_doctests, items = doctest_functions(source), []
    for node, spans, (function_start, function_end) in function_spans(source):
        if task not in spans:
            continue
        first, end = spans[task]
        inside = [i for i, (start, stop) in enumerate(offsets) if start >= first and stop <= end]
        if not token_range[0] <= len(inside) <= token_range[1]:
            continue
        i0, i1 = inside[0], inside[-1] + 1
        target = source[offsets[i0][0] : offsets[i1 - 1][1]]
        if tokenizer.decode(ids[i0:i1], clean_up_tokenization_spaces=False) != target:
            continue
        left = ids[max(0, i0 - left_tokens) : i0]
        if task == "continuation":
            prompt, after = left, ""
        else:
            prompt = left + [tokenizer.mask_token_id] * (i1 - i0) + ids[i1 : i1 + right_tokens]
            after = source[offsets[i1 - 1][1] : function_end]
        doctest_target = (import_as, with_doctests[node.lineno]) if node.lineno in with_doctests else None
        item = CodeItem(task, module, node.name, tuple(prompt), target, tuple(ids[i0:i1]),
                        source[function_start : offsets[i0][0]], after, doctest_target)
        if scores(item, target, item.target_ids) == dict(exact=True, parses=True, tokens_right=i1 - i0):
            # (the original scores in full: not, say, a body indented by tabs)
            items.append(item)
    return items


@functools.cache
def held_out_items(tokenizer, task: str, token_range: tuple[int, int], left_tokens: int,
                   right_tokens: int) -> dict[str, list[CodeItem]]:
    """Every item of `task` in the held-out modules, by module (in the order of `HELD_OUT_MODULES`), each module's
    files and functions in their order. Cached: the sample and the doctests' pool ask for the same items where their
    token ranges agree (callers read the lists, never change them)."""
    by_module = {module: [] for module in HELD_OUT_MODULES}
    root = stdlib_root()
    for path in stdlib_files("heldout"):
        relative = path.relative_to(root)
        by_module[top_level_module(relative)] += module_items(
            path.read_text(encoding="utf-8"), top_level_module(relative), tokenizer, task, token_range, left_tokens,
            right_tokens, import_name(relative))
    return by_module


def take_in_turn(by_module: dict[str, list[CodeItem]], count: int) -> list[CodeItem]:
    """Up to `count` items, the first of each module in turn, then the second, ..."""
    chosen, turn = [], 0
    while len(chosen) < count and any(len(items) > turn for items in by_module.values()):
        chosen += [items[turn] for items in by_module.values() if len(items) > turn][: count - len(chosen)]
        turn += 1
    return chosen


def code_items(tokenizer, task: str, count: int, token_range: tuple[int, int], left_tokens: int,
               right_tokens: int) -> list[CodeItem]:
    """`count` items of `task`, taken from the held-out modules in turn (the first unused item of each module in the
    order of `HELD_OUT_MODULES`, then the second, ...), each module's files and functions in their order."""
    chosen = take_in_turn(held_out_items(tokenizer, task, token_range, left_tokens, right_tokens), count)
    if len(chosen) < count:
        raise ValueError(f"only {len(chosen)} held-out items of task {task!r} with {token_range} tokens")
    return chosen


def doctest_items(tokenizer, task: str, count: int, token_range: tuple[int, int], left_tokens: int,
                  right_tokens: int, sample: list[CodeItem], cache: dict) -> list[CodeItem]:
    """The wider pool of the doctest score: up to `count` items of `task` outside `sample`, in turn from the modules,
    of functions whose original passes its doctests."""
    by_module = held_out_items(tokenizer, task, token_range, left_tokens, right_tokens)
    return take_in_turn({module: [item for item in items if item.doctest_target and item not in sample
                                  and doctest_outcome(item, item.target, cache).passed]
                         for module, items in by_module.items()}, count)


def with_checked_doctests(items: list[CodeItem], cache: dict) -> list[CodeItem]:
    """The items, those whose function's original fails its doctests (or cannot be run by the doctest runner) without
    their doctest target."""
    return [item if item.doctest_target is None or doctest_outcome(item, item.target, cache).passed
            else replace(item, doctest_target=None) for item in items]


def completed_functions(item: CodeItem, generated: str) -> list[str]:
    """The function with the generated text in the span; for a continuation, also without its last line, which the
    token budget may have cut short."""
    function = item.before + generated + item.after
    return [function] + ([complete_lines(function)] if item.task == "continuation" else [])


def doctest_outcome(item: CodeItem, generated: str, cache: dict) -> DoctestOutcome:
    """The doctests of the item's function run against the first of its completed forms that parses (one that parses
    in neither form fails unrun); outcomes are kept in `cache` by function and source."""
    source = next((f for f in completed_functions(item, generated) if parses(textwrap.dedent(f))), None)
    if source is None:
        return DoctestOutcome("failed", detail="does not parse")
    key = (*item.doctest_target, source)
    if key not in cache:
        cache[key] = run_function_doctests(*item.doctest_target, source)
    return cache[key]


def scores(item: CodeItem, generated: str, generated_ids) -> dict:
    """One output's exact match, whether the function (dedented) with the generated text in the span parses, and
    how many of the span's tokens it has right, position by position."""
    candidates = completed_functions(item, generated)
    return dict(exact=generated == item.target, parses=any(parses(textwrap.dedent(c)) for c in candidates),
                tokens_right=sum(int(a) == b for a, b in zip(generated_ids, item.target_ids)))


def decoding_settings(thresholds, cache_threshold: float, block_model: bool) -> list[tuple[str, str, object]]:
    """(name, family, n -> generate() keyword arguments for n masks) of every setting measured; each family's first
    setting is its one token per step point."""
    settings = [("one token per step", NO_CACHE, lambda n: dict(steps=None)),
                ("half the steps", NO_CACHE, lambda n: dict(steps=-(-n // 2)))]
    settings += [(f"threshold {t}", NO_CACHE, lambda n, t=t: dict(steps=None, confidence_threshold=t))
                 for t in thresholds]
    settings += [("block cache, one token per step", BLOCK_CACHE, lambda n: dict(steps=None, use_block_cache=True)),
                 (f"block cache, threshold {cache_threshold}", BLOCK_CACHE,
                  lambda n: dict(steps=None, use_block_cache=True, confidence_threshold=cache_threshold))]
    if block_model:
        # A block model generates in its own blocks: block_length=None wins over the continuations' --block_length
        # (decode's arguments override the task's lengths), which a block model of another block size refuses.
        settings += [("block model, exact cache, one token per step", BLOCK_MODEL,
                      lambda n: dict(steps=None, block_length=None)),
                     (f"block model, exact cache, threshold {cache_threshold}", BLOCK_MODEL,
                      lambda n: dict(steps=None, block_length=None, confidence_threshold=cache_threshold))]
    return settings


def decode(model, item: CodeItem, mask_token_id: int, arguments: dict, block_length) -> tuple[list, int, float]:
    """One item decoded with one setting (its `arguments` win over the task's lengths): the generated tokens, the
    forward passes and the wall seconds it took."""
    if item.task == "continuation":
        lengths = dict(max_new_tokens=item.target_tokens, block_length=block_length)
    else:
        lengths = dict(max_new_tokens=None)  # infilling only
    ids = torch.tensor([item.prompt_ids])
    start = time.perf_counter()
    out = model.generate(ids, do_sample=False, return_dict_in_generate=True, **{**lengths, **arguments})
    seconds = time.perf_counter() - start
    if item.task == "continuation":
        new = out.sequences[0, ids.shape[1] :]
    else:
        new = out.sequences[0, ids[0] == mask_token_id]
    return new.tolist(), out.num_forward_passes, seconds


def new_row(name: str, family: str) -> dict:
    return dict(setting=name, family=family, tokens=0, forward_passes=0, seconds=0.0,
                tasks={task: dict(items=0, exact=0, parses=0, tokens=0, tokens_right=0) for task in TASKS}, outputs=[],
                doctests=dict(items=0, passed=0, tokens=0, forward_passes=0, seconds=0.0, outputs=[], statuses=[],
                              tasks={task: dict(items=0, passed=0) for task in TASKS}))


def tally(row: dict, item: CodeItem, generated: str, generated_ids: list, passes: int, seconds: float) -> None:
    score = scores(item, generated, generated_ids)
    row["tokens"] += item.target_tokens
    row["forward_passes"] += passes
    row["seconds"] += seconds
    task = row["tasks"][item.task]
    task["items"] += 1
    task["exact"] += score["exact"]
    task["parses"] += score["parses"]
    task["tokens"] += item.target_tokens
    task["tokens_right"] += score["tokens_right"]
    row["outputs"].append(generated)


def tally_doctests(row: dict, item: CodeItem, generated: str, outcome: DoctestOutcome, passes: int,
                   seconds: float) -> None:
    doctests = row["doctests"]
    doctests["items"] += 1
    doctests["passed"] += outcome.passed
    doctests["tokens"] += item.target_tokens
    doctests["forward_passes"] += passes
    doctests["seconds"] += seconds
    doctests["tasks"][item.task]["items"] += 1
    doctests["tasks"][item.task]["passed"] += outcome.passed
    doctests["outputs"].append(generated)
    doctests["statuses"].append(outcome.status)


def summarise(row: dict) -> None:
    """Rates per task, and the accuracy: their mean over the tasks, in percent; the doctest pass rate, pooled over the
    doctest items (where there are any), with their tokens per forward pass."""
    for task in row["tasks"].values():
        task.update(exact_rate=task["exact"] / task["items"], parse_rate=task["parses"] / task["items"],
                    token_rate=task["tokens_right"] / task["tokens"])
    row["tokens_per_forward"] = row["tokens"] / row["forward_passes"]
    for kind, rate in KINDS.items():
        row[f"accuracy_{kind}"] = 100 * sum(task[rate] for task in row["tasks"].values()) / len(row["tasks"])
    doctests = row["doctests"]
    if doctests["items"]:
        row["accuracy_doctests"] = 100 * doctests["passed"] / doctests["items"]
        row["doctest_tokens_per_forward"] = doctests["tokens"] / doctests["forward_passes"]


def accuracy_kinds(rows: list[dict]) -> list[str]:
    """The kinds of accuracy the rows have: the three of the sample, and doctests where any item had them."""
    return [kind for kind in PARALLELISM if f"accuracy_{kind}" in rows[0]]


def add_aup(rows: list[dict], thresholds) -> dict:
    """Each row's AUP (each kind of accuracy, at its parallelism) over its family's one token per step point and its
    own; and the AUP of the whole threshold curve (no cache: one token per step, then every threshold)."""
    best = {kind: max(row[f"accuracy_{kind}"] for row in rows) for kind in accuracy_kinds(rows)}
    first_of_family = {}
    for row in rows:
        first_of_family.setdefault(row["family"], row)

    def aup(points: list[dict], kind: str) -> float:
        return accuracy_under_parallelism([p[PARALLELISM[kind]] for p in points],
                                          [p[f"accuracy_{kind}"] for p in points], best[kind])

    for row in rows:
        reference = first_of_family[row["family"]]
        for kind in best:
            row[f"aup_{kind}"] = aup([reference] if reference is row else [reference, row], kind)
    curve = [first_of_family[NO_CACHE]] + [row for row in rows if row["setting"].startswith("threshold ")]
    return {kind: aup(curve, kind) for kind in best}


def doctest_census(cache: dict) -> dict:
    """How many held-out functions the doctest runner can replace have doctest examples, and whose original passes
    them."""
    functions = passing = 0
    root = stdlib_root()
    for path in stdlib_files("heldout"):
        source = path.read_text(encoding="utf-8")
        names = doctest_functions(source)
        for node, _, (start, end) in function_spans(source):
            if node.lineno in names:
                key = (import_name(path.relative_to(root)), names[node.lineno], source[start:end])
                if key not in cache:
                    cache[key] = run_function_doctests(*key)
                functions += 1
                passing += cache[key].passed
    return dict(functions=functions, originals_passing=passing)


def doctest_paragraph(result: dict) -> list[str]:
    """The Markdown lines that say what the doctest score was taken over."""
    pool, listed = result["doctest_pool"], result["doctest_item_list"]
    counts = ", ".join(f"{sum(i['task'] == task for i in listed)} {task}" for task in TASKS)
    in_sample = sum(item["in_sample"] for item in listed)
    return [f"Doctests: {len(listed)} items ({counts}) of {len({(i['module'], i['qualname']) for i in listed})} "
            f"functions: {in_sample} of the sample's items, the rest a wider pool (up to {pool['items']} a task, "
            f"spans of {pool['line_tokens'][0]}-{pool['line_tokens'][1]} tokens for a line, "
            f"{pool['body_tokens'][0]}-{pool['body_tokens'][1]} for a body). Of the held-out functions, "
            f"{pool['functions']} (top-level, or methods of top-level classes) have doctest examples in their "
            f"docstrings and {pool['originals_passing']} of them pass with the original in the runner: only those "
            "are scored. The completed function replaces the original in its module and its examples run in a "
            "subprocess (timeout 5 s, 4 CPU seconds, 2 GiB address space, 1 MiB files, no core files, a fresh "
            "temporary folder); it passes only if all of them pass, and it checks only what they exercise (a line "
            "they do not reach passes whatever is written there). Doctests %: pooled over these items; their AUP at "
            "the doctest items' own tokens per forward pass; wall s and the other scores are the sample's.", ""]


def markdown(result: dict) -> str:
    counts = ", ".join(f"{count} {task}" for task, count in result["items"].items())
    kinds = accuracy_kinds(result["rows"])
    names = dict(exact="exact", tokens="tokens right", parses="parses", doctests="doctests")
    lines = [
        f"# Speed against quality: {result['model']}, CPU",
        "",
        f"Held-out standard-library functions ({counts} items; {result['left_tokens']} tokens of context before, "
        f"{result['right_tokens']} after a fill); greedy, low-confidence remasking; continuations in blocks of "
        f"{result['block_length']}. Exact: the generated text is the original; tokens right: the span's tokens "
        "generated right, position by position; parses: the function with the generated text parses. Each accuracy is "
        "the mean of the three tasks' rates, in percent. AUP: d3LLM's accuracy under parallelism (alpha 3; a point "
        "more than 5 points below the least parallel one is dropped) over the curve of the setting's family's one "
        "token per step point and its own; y_max the best accuracy of all rows. Wall s: the `generate()` calls of "
        "every item, on a shared machine.",
        "",
        *(doctest_paragraph(result) if "doctests" in kinds else []),
        "| setting | tokens / forward | wall s | " + " | ".join(f"{names[k]} %" for k in kinds) + " | "
        + " | ".join(f"AUP {names[k]}" for k in kinds) + " |",
        "|---|---|---|" + "---|" * 2 * len(kinds),
    ]
    for row in result["rows"]:
        lines.append(f"| {row['setting']} | {row['tokens_per_forward']:.2f} | {row['seconds']:.1f} | "
                     + " | ".join(f"{row[f'accuracy_{kind}']:.1f}" for kind in kinds) + " | "
                     + " | ".join(f"{row[f'aup_{kind}']:.1f}" for kind in kinds) + " |")
    doctests = "doctests" in kinds
    lines += ["", "Each task (exact / tokens right / parses, %" + ("; doctests passed / items" if doctests else "")
              + "):", "", "| setting | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
    for row in result["rows"]:
        rates = [" / ".join(f"{100 * row['tasks'][task][rate]:.0f}" for rate in KINDS.values())
                 + (f"; {row['doctests']['tasks'][task]['passed']} / {row['doctests']['tasks'][task]['items']}"
                    if doctests else "") for task in TASKS]
        lines.append(f"| {row['setting']} | " + " | ".join(rates) + " |")
    curve = result["threshold_curve_aup"]
    lines += ["", "AUP of the threshold curve (one token per step, then every threshold, no cache): "
              + ", ".join(f"{curve[kind]:.1f} ({names[kind]})" for kind in kinds) + ".", "", *result["notes"]]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    markers = {"parses": "s", "tokens": "o", "exact": "^", "doctests": "D"}
    kinds = [kind for kind in markers if kind in accuracy_kinds(result["rows"])]
    for axis, x_key, x_label in ((axes[0], "tokens_per_forward", "tokens per forward pass"),
                                 (axes[1], "seconds", "wall seconds, all items of the sample (shared CPU core)")):
        for index, row in enumerate(result["rows"]):  # a colour a setting, a marker a kind of accuracy
            for kind in kinds:
                if kind == "doctests" and x_key == "seconds":  # the doctest items' time is not the sample's
                    continue
                x = row[PARALLELISM[kind]] if x_key == "tokens_per_forward" else row[x_key]
                axis.scatter(x, row[f"accuracy_{kind}"], marker=markers[kind], color=f"C{index}", alpha=0.8,
                             label=row["setting"] if kind == "parses" else None)
        axis.set(xlabel=x_label, ylabel="accuracy, % (mean over the three tasks; doctests pooled)")
        axis.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, title="setting", title_fontsize=8)
    handles = [plt.Line2D([], [], color="grey", marker=markers[k], linestyle="",
                          label=f"accuracy: {k}" + (" (left: its items' tokens a pass)" if k == "doctests" else ""))
               for k in kinds]
    axes[1].legend(handles=handles, fontsize=8)
    device = result["environment"]["device"]
    figure.suptitle(f"Decoding settings of {result['model']}: speed against quality ({device})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="path stem of the .json, .md and .png")
    parser.add_argument("--model", default=None, help="model folder (default: the package's default model)")
    parser.add_argument("--block_model", default=None, help="a trained block diffusion model's folder, same tokenizer")
    parser.add_argument("--items", type=int, default=20, help="items per task")
    parser.add_argument("--left_tokens", type=int, default=96)
    parser.add_argument("--right_tokens", type=int, default=24)
    parser.add_argument("--line_tokens", type=int, nargs=2, default=[3, 12], help="a line's tokens, min and max")
    parser.add_argument("--body_tokens", type=int, nargs=2, default=[6, 20], help="a body's tokens, min and max")
    parser.add_argument("--doctest_items", type=int, default=20, help="most items a task in the doctests' wider pool")
    parser.add_argument("--doctest_line_tokens", type=int, nargs=2, default=[3, 24], help="the pool's lines")
    parser.add_argument("--doctest_body_tokens", type=int, nargs=2, default=[6, 48], help="the pool's bodies")
    parser.add_argument("--block_length", type=int, default=8, help="continuations' block length")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.5, 0.3, 0.1])
    parser.add_argument("--cache_threshold", type=float, default=0.5)
    parser.add_argument("--smoke", action="store_true", help="one short item per task, short contexts (tests)")
    args = parser.parse_args()
    if args.smoke:
        args.items, args.left_tokens, args.right_tokens, args.line_tokens, args.body_tokens = 1, 24, 8, [3, 6], [4, 8]
        args.doctest_items, args.doctest_line_tokens, args.doctest_body_tokens = 1, [3, 8], [4, 8]
    return args


def sample_and_pool(args, tokenizer, cache: dict) -> tuple[list[CodeItem], list[CodeItem]]:
    """The sample (`--items` a task; its items of functions whose original fails its doctests without a doctest
    target) and the doctests' wider pool outside it."""
    spans = {"line": args.line_tokens, "body": args.body_tokens, "continuation": args.body_tokens}
    sample = with_checked_doctests(
        [item for task in TASKS for item in code_items(tokenizer, task, args.items, tuple(spans[task]),
                                                       args.left_tokens, args.right_tokens)], cache)
    pool_spans = {"line": args.doctest_line_tokens, "body": args.doctest_body_tokens,
                  "continuation": args.doctest_body_tokens}
    pool = [item for task in TASKS for item in doctest_items(tokenizer, task, args.doctest_items,
                                                             tuple(pool_spans[task]), args.left_tokens,
                                                             args.right_tokens, sample, cache)]
    return sample, pool


def item_record(item: CodeItem, **more) -> dict:
    return dict(task=item.task, module=item.module, function=item.function, tokens=item.target_tokens,
                target=item.target, **more)


def main():
    args = parse_arguments()
    folder = args.model or str(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    cache = {}  # doctest outcomes by (module, function, source)
    sample, pool = sample_and_pool(args, tokenizer, cache)
    scored = [item for item in sample if item.doctest_target] + pool  # the doctest items
    result = new_result(model=Path(folder).name, block_model=args.block_model, dtype="float32",
                        torch_threads=torch.get_num_threads(), items={t: args.items for t in TASKS},
                        left_tokens=args.left_tokens, right_tokens=args.right_tokens, block_length=args.block_length,
                        item_list=[item_record(i) for i in sample],
                        doctest_pool=dict(items=args.doctest_items, line_tokens=args.doctest_line_tokens,
                                          body_tokens=args.doctest_body_tokens, **doctest_census(cache)),
                        doctest_item_list=[item_record(i, qualname=i.doctest_target[1], in_sample=i in sample)
                                           for i in scored], rows=[], notes=[])
    models = {NO_CACHE: DiffuAprielForMaskedLM.from_pretrained(folder, dtype=torch.float32).eval()}
    models[BLOCK_CACHE] = models[NO_CACHE]
    if args.block_model is not None:
        models[BLOCK_MODEL] = DiffuAprielForMaskedLM.from_pretrained(args.block_model, dtype=torch.float32).eval()
    else:
        result["notes"].append("No trained block diffusion checkpoint was available: the block model's exact cache "
                               "has no row (run again with --block_model FOLDER once one is trained).")
    settings = decoding_settings(args.thresholds, args.cache_threshold, args.block_model is not None)
    result["rows"] = [new_row(name, family) for name, family, _ in settings]
    # Item after item, every setting in turn: a shared machine's load weighs on every setting alike. The doctest
    # items are the sample's with doctests, then the pool's, in the order of doctest_item_list.
    for number, item in enumerate(sample + pool):
        for row, (name, family, arguments) in zip(result["rows"], settings):
            generated_ids, passes, seconds = decode(models[family], item, tokenizer.mask_token_id,
                                                    arguments(item.target_tokens), args.block_length)
            generated = tokenizer.decode(generated_ids, clean_up_tokenization_spaces=False)
            if item in sample:
                tally(row, item, generated, generated_ids, passes, seconds)
            if item.doctest_target:
                tally_doctests(row, item, generated, doctest_outcome(item, generated, cache), passes, seconds)
        print(f"item {number + 1} of {len(sample) + len(pool)} ({item.task}, {item.module}.{item.function})",
              flush=True)
    for row in result["rows"]:
        summarise(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("outputs", "tasks", "doctests")}), flush=True)
    result["threshold_curve_aup"] = add_aup(result["rows"], args.thresholds)
    json_path = save(result, args.out, markdown=markdown(result))
    try:
        plot(result, json_path.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no plot written")


if __name__ == "__main__":
    main()
