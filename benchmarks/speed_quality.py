"""Speed against quality: what each decoding setting of `generate()` buys in tokens per forward pass and wall time, and
what it costs in accuracy, with the shipped model on the CPU over held-out standard-library code.

Tasks, on functions of the held-out modules (`HELD_OUT_MODULES` of training/stdlib_corpus.py: never trained on), each
with the tokens around it as context (`--left_tokens` before; for the fills also `--right_tokens` after):
- line: one line of a function's body masked (the middle statement of the body written on one line);
- body: the function's whole body masked (after its docstring);
- continuation: the function's header (and docstring) as the prompt, as many new tokens as its body has.
Scores: exact match (the generated text is the original), the span's tokens generated right (position by position) and
parsing (the function with the generated code parses as Python, dedented; a continuation may drop its last, possibly
cut, line). Doctests are not run: that would execute generated code, which needs a sandbox of its own.

Decoding settings (greedy, low-confidence remasking): one token per step; half the steps; Fast-dLLM's confidence
threshold at several values; the approximate block cache of the full-sequence model (one token per step, and with a
threshold); with --block_model, a trained block diffusion model with its exact cache (one token per step). The
continuation runs in blocks of `--block_length`; a fill is one block of its masks. For each setting: tokens per forward
pass (generated tokens over forward passes, all items), the wall seconds of its `generate()` calls, the three scores
(each task's rate, and their mean over the tasks: the accuracy of that kind), and AUP
(`diffuapriel_hf.evaluation.parallelism.accuracy_under_parallelism`) of the setting's curve: its family's one token per
step point (no cache, block cache, block model), then its own point; y_max the best accuracy of all rows.

    python benchmarks/speed_quality.py --out benchmarks/results/speed_quality_cpu       # .json, .md and .png
    python benchmarks/speed_quality.py --smoke --out /tmp/speed_quality                 # one short item per task
"""

import argparse
import ast
import json
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from diffuapriel_hf import DiffuAprielForMaskedLM
from diffuapriel_hf.cli.generate import default_model_path
from diffuapriel_hf.evaluation.parallelism import accuracy_under_parallelism
from diffuapriel_hf.training.evaluation import complete_lines, parses
from diffuapriel_hf.training.stdlib_corpus import HELD_OUT_MODULES, stdlib_files, stdlib_root, top_level_module
from harness import new_result, save  # benchmarks/harness.py, beside this script

TASKS = ("line", "body", "continuation")
NO_CACHE, BLOCK_CACHE, BLOCK_MODEL = "no cache", "block cache", "block model"
# Each kind of accuracy and the per-task rate it averages.
KINDS = {"exact": "exact_rate", "tokens": "token_rate", "parses": "parse_rate"}


@dataclass(frozen=True)
class CodeItem:
    """One task on one function. prompt_ids: the context with masks where the span was (fills), or the context up to
    the span (continuation); target: the span's original text, target_ids its tokens; before / after: the function's
    text before and after the span, which the generated text is put between to parse it."""

    task: str
    module: str
    function: str
    prompt_ids: tuple[int, ...]
    target: str
    target_ids: tuple[int, ...]
    before: str
    after: str

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


def module_items(source: str, module: str, tokenizer, task: str, token_range: tuple[int, int], left_tokens: int,
                 right_tokens: int) -> list[CodeItem]:
    """The items of `task` in one file: spans of `token_range` tokens (inclusive), taken as whole tokens of the file's
    own tokenization (a token that crosses the span's edge stays in the context), the original text reproduced by
    decoding them."""
    encoding = tokenizer(source, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = encoding.input_ids, encoding.offset_mapping
    items = []
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
        item = CodeItem(task, module, node.name, tuple(prompt), target, tuple(ids[i0:i1]),
                        source[function_start : offsets[i0][0]], after)
        if scores(item, target, item.target_ids) == dict(exact=True, parses=True, tokens_right=i1 - i0):
            # (the original scores in full: not, say, a body indented by tabs)
            items.append(item)
    return items


def code_items(tokenizer, task: str, count: int, token_range: tuple[int, int], left_tokens: int,
               right_tokens: int) -> list[CodeItem]:
    """`count` items of `task`, taken from the held-out modules in turn (the first unused item of each module in the
    order of `HELD_OUT_MODULES`, then the second, ...), each module's files and functions in their order."""
    by_module = {module: [] for module in HELD_OUT_MODULES}
    root = stdlib_root()
    for path in stdlib_files("heldout"):
        module = top_level_module(path.relative_to(root))
        by_module[module] += module_items(path.read_text(encoding="utf-8"), module, tokenizer, task, token_range,
                                          left_tokens, right_tokens)
    chosen, turn = [], 0
    while len(chosen) < count and any(len(items) > turn for items in by_module.values()):
        chosen += [items[turn] for items in by_module.values() if len(items) > turn][: count - len(chosen)]
        turn += 1
    if len(chosen) < count:
        raise ValueError(f"only {len(chosen)} held-out items of task {task!r} with {token_range} tokens")
    return chosen


def scores(item: CodeItem, generated: str, generated_ids) -> dict:
    """One output's exact match, whether the function (dedented) with the generated text in the span parses, and
    how many of the span's tokens it has right, position by position."""
    function = item.before + generated + item.after
    candidates = [function] + ([complete_lines(function)] if item.task == "continuation" else [])
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
        settings.append(("block model, exact cache, one token per step", BLOCK_MODEL, lambda n: dict(steps=None)))
    return settings


def decode(model, item: CodeItem, mask_token_id: int, arguments: dict, block_length) -> tuple[list, int, float]:
    """One item decoded with one setting: the generated tokens, the forward passes and the wall seconds it took."""
    if item.task == "continuation":
        lengths = dict(max_new_tokens=item.target_tokens, block_length=block_length)
    else:
        lengths = dict(max_new_tokens=None)  # infilling only
    ids = torch.tensor([item.prompt_ids])
    start = time.perf_counter()
    out = model.generate(ids, do_sample=False, return_dict_in_generate=True, **lengths, **arguments)
    seconds = time.perf_counter() - start
    if item.task == "continuation":
        new = out.sequences[0, ids.shape[1] :]
    else:
        new = out.sequences[0, ids[0] == mask_token_id]
    return new.tolist(), out.num_forward_passes, seconds


def new_row(name: str, family: str) -> dict:
    return dict(setting=name, family=family, tokens=0, forward_passes=0, seconds=0.0,
                tasks={task: dict(items=0, exact=0, parses=0, tokens=0, tokens_right=0) for task in TASKS}, outputs=[])


def tally(row: dict, item: CodeItem, tokenizer, generated_ids: list, passes: int, seconds: float) -> None:
    generated = tokenizer.decode(generated_ids, clean_up_tokenization_spaces=False)
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


def summarise(row: dict) -> None:
    """Rates per task, and the accuracy: their mean over the tasks, in percent."""
    for task in row["tasks"].values():
        task.update(exact_rate=task["exact"] / task["items"], parse_rate=task["parses"] / task["items"],
                    token_rate=task["tokens_right"] / task["tokens"])
    row["tokens_per_forward"] = row["tokens"] / row["forward_passes"]
    for kind, rate in KINDS.items():
        row[f"accuracy_{kind}"] = 100 * sum(task[rate] for task in row["tasks"].values()) / len(row["tasks"])


def add_aup(rows: list[dict], thresholds) -> dict:
    """Each row's AUP (exact match and parsing accuracy) over its family's one token per step point and its own; and
    the AUP of the whole threshold curve (no cache: one token per step, then every threshold)."""
    best = {kind: max(row[f"accuracy_{kind}"] for row in rows) for kind in KINDS}
    first_of_family = {}
    for row in rows:
        first_of_family.setdefault(row["family"], row)
    for row in rows:
        reference = first_of_family[row["family"]]
        points = [reference] if reference is row else [reference, row]
        for kind in best:
            row[f"aup_{kind}"] = accuracy_under_parallelism(
                [p["tokens_per_forward"] for p in points], [p[f"accuracy_{kind}"] for p in points], best[kind])
    curve = [first_of_family[NO_CACHE]] + [row for row in rows if row["setting"].startswith("threshold ")]
    return {kind: accuracy_under_parallelism([p["tokens_per_forward"] for p in curve],
                                             [p[f"accuracy_{kind}"] for p in curve], best[kind]) for kind in best}


def markdown(result: dict) -> str:
    counts = ", ".join(f"{count} {task}" for task, count in result["items"].items())
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
        "| setting | tokens / forward | wall s | exact % | tokens right % | parses % | AUP exact | AUP tokens right "
        "| AUP parses |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['setting']} | {row['tokens_per_forward']:.2f} | {row['seconds']:.1f} | "
                     + " | ".join(f"{row[f'accuracy_{kind}']:.1f}" for kind in KINDS) + " | "
                     + " | ".join(f"{row[f'aup_{kind}']:.1f}" for kind in KINDS) + " |")
    lines += ["", "Each task (exact / tokens right / parses, %):", "",
              "| setting | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
    for row in result["rows"]:
        rates = [" / ".join(f"{100 * row['tasks'][task][rate]:.0f}" for rate in KINDS.values()) for task in TASKS]
        lines.append(f"| {row['setting']} | " + " | ".join(rates) + " |")
    curve = result["threshold_curve_aup"]
    lines += ["", "AUP of the threshold curve (one token per step, then every threshold, no cache): "
              + ", ".join(f"{curve[kind]:.1f} ({kind})" for kind in KINDS) + ".", "", *result["notes"]]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    markers = {"parses": "s", "tokens": "o", "exact": "^"}
    for axis, x_key, x_label in ((axes[0], "tokens_per_forward", "tokens per forward pass"),
                                 (axes[1], "seconds", "wall seconds, all items (shared CPU core)")):
        for index, row in enumerate(result["rows"]):  # a colour a setting, a marker a kind of accuracy
            for kind, marker in markers.items():
                axis.scatter(row[x_key], row[f"accuracy_{kind}"], marker=marker, color=f"C{index}", alpha=0.8,
                             label=row["setting"] if kind == "parses" else None)
        axis.set(xlabel=x_label, ylabel="accuracy, % (mean over the three tasks)")
        axis.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, title="setting", title_fontsize=8)
    kinds = [plt.Line2D([], [], color="grey", marker=m, linestyle="", label=f"accuracy: {k}")
             for k, m in markers.items()]
    axes[1].legend(handles=kinds, fontsize=8)
    device = result["environment"]["device"]
    figure.suptitle(f"Decoding settings of {result['model']}: speed against quality ({device})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="path stem of the .json, .md and .png")
    parser.add_argument("--model", default=None, help="model folder (default: the package's default model)")
    parser.add_argument("--block_model", default=None, help="a trained block diffusion model's folder, same tokenizer")
    parser.add_argument("--items", type=int, default=20, help="items per task")
    parser.add_argument("--left_tokens", type=int, default=96)
    parser.add_argument("--right_tokens", type=int, default=24)
    parser.add_argument("--line_tokens", type=int, nargs=2, default=[3, 12], help="a line's tokens, min and max")
    parser.add_argument("--body_tokens", type=int, nargs=2, default=[6, 20], help="a body's tokens, min and max")
    parser.add_argument("--block_length", type=int, default=8, help="continuations' block length")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.5, 0.3, 0.1])
    parser.add_argument("--cache_threshold", type=float, default=0.5)
    parser.add_argument("--smoke", action="store_true", help="one short item per task, short contexts (tests)")
    args = parser.parse_args()
    if args.smoke:
        args.items, args.left_tokens, args.right_tokens, args.line_tokens, args.body_tokens = 1, 24, 8, [3, 6], [4, 8]
    folder = args.model or str(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    items = [item for task, span in (("line", args.line_tokens), ("body", args.body_tokens),
                                     ("continuation", args.body_tokens))
             for item in code_items(tokenizer, task, args.items, tuple(span), args.left_tokens, args.right_tokens)]
    result = new_result(model=Path(folder).name, block_model=args.block_model, dtype="float32",
                        torch_threads=torch.get_num_threads(), items={t: args.items for t in TASKS},
                        left_tokens=args.left_tokens, right_tokens=args.right_tokens, block_length=args.block_length,
                        item_list=[dict(task=i.task, module=i.module, function=i.function, tokens=i.target_tokens,
                                        target=i.target) for i in items], rows=[], notes=[])
    models = {NO_CACHE: DiffuAprielForMaskedLM.from_pretrained(folder, dtype=torch.float32).eval()}
    models[BLOCK_CACHE] = models[NO_CACHE]
    if args.block_model is not None:
        models[BLOCK_MODEL] = DiffuAprielForMaskedLM.from_pretrained(args.block_model, dtype=torch.float32).eval()
    else:
        result["notes"].append("No trained block diffusion checkpoint was available: the block model's exact cache "
                               "has no row (run again with --block_model FOLDER once one is trained).")
    result["notes"].append("Doctests not run: they would execute generated code, which needs a sandbox.")
    settings = decoding_settings(args.thresholds, args.cache_threshold, args.block_model is not None)
    result["rows"] = [new_row(name, family) for name, family, _ in settings]
    # Item after item, every setting in turn: a shared machine's load weighs on every setting alike.
    for number, item in enumerate(items):
        for row, (name, family, arguments) in zip(result["rows"], settings):
            block_length = None if family == BLOCK_MODEL else args.block_length
            arguments_here = arguments(item.target_tokens)
            tally(row, item, tokenizer,
                  *decode(models[family], item, tokenizer.mask_token_id, arguments_here, block_length))
        print(f"item {number + 1} of {len(items)} ({item.task}, {item.module}.{item.function})", flush=True)
    for row in result["rows"]:
        summarise(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("outputs", "tasks")}), flush=True)
    result["threshold_curve_aup"] = add_aup(result["rows"], args.thresholds)
    json_path = save(result, args.out, markdown=markdown(result))
    try:
        plot(result, json_path.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no plot written")


if __name__ == "__main__":
    main()
