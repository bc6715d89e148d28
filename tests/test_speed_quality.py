"""Speed against quality (benchmarks/speed_quality.py): accuracy under parallelism as d3LLM defines it, the held-out
code items, and the script end to end on one short item per task (`--smoke`)."""

import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from diffuapriel_hf import DiffuAprielForMaskedLM, default_model_path
from diffuapriel_hf.evaluation.parallelism import accuracy_under_parallelism, parallelism_weight

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "speed_quality.py"


def test_one_point_scores_its_rectangle():
    assert accuracy_under_parallelism([1.0], [60.0]) == 60.0
    assert accuracy_under_parallelism([2.5], [40.0], best_accuracy=80.0) == 100.0  # the first point is not weighted


def test_points_at_the_best_accuracy_add_whole_trapezoids():
    assert accuracy_under_parallelism([1.0, 2.0, 4.0], [80.0, 80.0, 78.0]) == pytest.approx(
        80 + 80 + 2 * (80 + 78 * math.exp(-3 * (1 - 78 / 80))) / 2)


def test_accuracy_below_the_best_is_discounted_and_order_does_not_matter():
    weight = math.exp(-3 * (1 - 60 / 90))
    assert parallelism_weight(60.0, 90.0) == pytest.approx(weight)
    assert parallelism_weight(95.0, 90.0) == 1.0
    expected = 1 * 62 + (3 - 1) * (62 * math.exp(-3 * (1 - 62 / 90)) + 60 * weight) / 2
    assert accuracy_under_parallelism([3.0, 1.0], [60.0, 62.0], best_accuracy=90.0) == pytest.approx(expected)


def test_points_far_below_the_least_parallel_one_earn_nothing():
    # 74 is more than 5 points below 80: the faster point is left out.
    assert accuracy_under_parallelism([1.0, 6.0], [80.0, 74.0]) == 80.0
    assert accuracy_under_parallelism([1.0, 6.0], [80.0, 76.0]) > 80.0
    assert accuracy_under_parallelism([1.0, 2.0], [0.0, 0.0]) == 0.0  # nothing right anywhere


@pytest.mark.parametrize("parallelism, accuracy, best, message", [
    ([1.0], [50.0, 60.0], None, "one length"),
    ([], [], None, "non-empty"),
    ([0.0], [50.0], None, "positive"),
    ([1.0], [150.0], None, "percent"),
    ([1.0, 2.0], [50.0, 60.0], 55.0, "best_accuracy"),
])
def test_bad_curves_are_refused_by_name(parallelism, accuracy, best, message):
    with pytest.raises(ValueError, match=message):
        accuracy_under_parallelism(parallelism, accuracy, best_accuracy=best)


@pytest.fixture
def speed_quality(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import speed_quality

    return speed_quality


def test_spans_are_a_functions_body_and_its_middle_line(speed_quality):
    source = textwrap.dedent('''\
        import os

        class A:
            def method(self, x):
                """Doc."""
                y = x + 1
                if y:
                    y = 2
                return y

            def one_liner(self): return 1
        ''')
    (node, spans, (start, end)), = speed_quality.function_spans(source)
    assert node.name == "method"
    assert source[slice(*spans["body"])] == "        y = x + 1\n        if y:\n            y = 2\n        return y"
    assert spans["continuation"] == spans["body"]
    assert source[slice(*spans["line"])] == "        return y"  # the middle one of the one-line statements
    assert source[start:end].startswith("    def method") and source[start:end].endswith("return y")


def test_functions_with_doctest_examples_are_found_by_their_qualified_names(speed_quality):
    source = textwrap.dedent('''\
        def top(x):
            """
            >>> top(1)
            1
            """
            return x

        def plain(x):
            """No examples."""
            return x

        class A:
            def method(self):
                """>>> A().method()"""

            def helper(self):
                def nested():
                    """>>> nested()"""
        ''')
    assert speed_quality.doctest_functions(source) == {1: "top", 13: "A.method"}  # a nested function is not replaceable
    assert speed_quality.import_name(Path("json/decoder.py")) == "json.decoder"
    assert speed_quality.import_name(Path("json/__init__.py")) == "json"


def test_items_reproduce_held_out_code_and_score_their_original(speed_quality):
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    items = speed_quality.code_items(tokenizer, "line", 3, (3, 12), 32, 8)
    assert len({item.module for item in items}) == 3  # one from each of the first modules in turn
    for item in items:
        assert item.prompt_ids.count(tokenizer.mask_token_id) == item.target_tokens
        assert speed_quality.scores(item, item.target, item.target_ids) == dict(
            exact=True, parses=True, tokens_right=item.target_tokens)
        wrong = speed_quality.scores(item, item.target + " +", (tokenizer.mask_token_id, *item.target_ids[1:]))
        assert wrong == dict(exact=False, parses=False, tokens_right=item.target_tokens - 1)


def test_the_script_runs_on_a_small_sample(speed_quality, tmp_path, monkeypatch):
    """The smoke run with a block model (the shipped weights with blocks of 16: the exact cache's rows, not its
    quality; loading drops the shipped generation block length 8, which the block model would refuse). The script's
    main() with its command line, in this process: a fresh interpreter would spend seconds importing what this one
    has (torch, transformers, the package)."""
    block_model = tmp_path / "block-model"
    DiffuAprielForMaskedLM.from_pretrained(default_model_path(), dtype=torch.float32, block_size=16).save_pretrained(
        block_model)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(block_model)
    out = tmp_path / "speed_quality"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--smoke", "--out", str(out), "--block_model", str(block_model)])
    speed_quality.main()
    result = json.loads(out.with_suffix(".json").read_text())
    assert [row["setting"] for row in result["rows"]] == [
        "one token per step", "half the steps", "threshold 0.9", "threshold 0.5", "threshold 0.3", "threshold 0.1",
        "block cache, one token per step", "block cache, threshold 0.5", "block model, exact cache, one token per step",
        "block model, exact cache, threshold 0.5"]
    block_one_step = result["rows"][-2]
    assert block_one_step["tokens_per_forward"] == 1.0 and block_one_step["aup_parses"] == pytest.approx(
        block_one_step["accuracy_parses"])  # the first point of its family
    one_step, half = result["rows"][:2]
    assert one_step["tokens_per_forward"] == 1.0 and half["tokens_per_forward"] > 1.5
    for kind in ("exact", "tokens", "parses"):  # one point: its rectangle
        assert one_step[f"aup_{kind}"] == pytest.approx(one_step[f"accuracy_{kind}"])
    assert all(sum(task["items"] for task in row["tasks"].values()) == 3 for row in result["rows"])
    assert result["doctest_pool"]["originals_passing"] >= len({i["qualname"] for i in result["doctest_item_list"]}) > 0
    for row in result["rows"]:  # each doctest item scored once a setting
        assert len(row["doctests"]["statuses"]) == row["doctests"]["items"] == len(result["doctest_item_list"])
        assert row["accuracy_doctests"] == pytest.approx(100 * row["doctests"]["passed"] / row["doctests"]["items"])
    assert one_step["aup_doctests"] == pytest.approx(one_step["accuracy_doctests"])
    assert "| doctests % |" in out.with_suffix(".md").read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert out.with_suffix(".png").stat().st_size > 0
