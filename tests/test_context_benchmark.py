"""The context benchmark runs, and what it reports holds whatever the machine's speed (no timing is asserted)."""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, Dict, List

import pytest

from conftest import ROOT

import context_benchmark
from demo_platform import DemoPlatform

QUESTIONS = [question for question, _, _, _ in context_benchmark.questions()]
FIGURES = {"calls", "requests", "chars", "tokens", "ms", "facts", "errors"}


@pytest.fixture(scope="module")
def small() -> Dict[str, Any]:
    """The script run as a person runs it, at 50 devices and 200 events with no latency: its table and JSON line."""
    ran = subprocess.run([sys.executable, str(ROOT / "tests" / "context_benchmark.py"),
                          "--sizes", "50", "--events", "200", "--latency", "0"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    [size] = json.loads(lines[-1])["sizes"]
    return {"table": [row for row in lines if row.startswith("|")], "size": size, "stdout": ran.stdout}


def cells(row: str) -> List[str]:
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_every_question_is_answered_both_ways_with_every_figure_and_no_error_result(small):
    size = small["size"]
    assert (size["devices"], size["events"], size["latency_s"]) == (50, 200, 0)
    assert [row["question"] for row in size["questions"]] == QUESTIONS and len(QUESTIONS) == 7
    for row in size["questions"]:
        for way in ("seed", "new"):
            figures = row[way]
            assert set(figures) == FIGURES, (row["question"], way)
            assert figures["errors"] == [], (row["question"], way)
            assert figures["calls"] >= 1 and figures["requests"] >= figures["calls"]
            assert figures["tokens"] == round(figures["chars"] / 4)
    assert "Error result" not in small["stdout"]


def test_the_markdown_table_has_a_row_per_question_and_a_totals_row_that_adds_them_up(small):
    header, rule, *rows = small["table"]
    assert cells(header) == ["Question", "Fleet", "Seed calls", "New calls", "Seed requests", "New requests",
                             "Seed characters", "New characters", "Seed ~tokens", "New ~tokens", "Seed ms", "New ms"]
    assert cells(rule) == ["---", "---"] + ["---:"] * 10
    assert [cells(row)[0] for row in rows] == ["%d. %s" % (n, q) for n, q in enumerate(QUESTIONS, 1)] + [
        "**All seven**"]
    assert {cells(row)[1] for row in rows} == {"50 devices, 200 events"}
    figures = small["size"]["questions"]
    for row, question in zip(rows, figures):
        assert cells(row)[2:10] == ["{:,}".format(question[way][key]) for key in ("calls", "requests", "chars",
                                                                                 "tokens") for way in ("seed", "new")]
    totals = [int(cell.replace(",", "")) for cell in cells(rows[-1])[2:10]]
    assert totals == [sum(q[way][key] for q in figures) for key in ("calls", "requests", "chars", "tokens")
                      for way in ("seed", "new")]


def test_both_ways_give_the_same_answers_and_they_are_the_platforms_own(small):
    answers = {row["question"]: row for row in small["size"]["questions"]}
    for question, row in answers.items():
        assert row["seed"]["facts"] == row["new"]["facts"], question
    # The truth, from the platform's in-memory state (the same seeds), not from any server answer.
    truth = DemoPlatform(devices=41, events=200)
    assert len(truth.devices) == 50
    assert answers[QUESTIONS[0]]["new"]["facts"] == {
        "devices": 50, "offline": sum(d["status"] == "offline" for d in truth.devices.values())}
    assert answers[QUESTIONS[2]]["new"]["facts"] == {
        "pending": sorted(g["id"] for g in truth.grants.values() if g["status"] == "pending")}
    assert [s for s, _ in answers[QUESTIONS[3]]["new"]["facts"]["open"]] == sorted(
        s["id"] for s in truth.sessions.values() if s["ended_at"] is None)
    assert answers[QUESTIONS[6]]["new"]["facts"]["intact"] is True


def test_question_1_the_new_way_needs_no_more_characters_than_the_seed_way_even_at_50_devices(small):
    first = small["size"]["questions"][0]
    assert first["new"]["chars"] <= first["seed"]["chars"]
    # Same calls both ways, same context.
    for same in small["size"]["questions"][5:]:
        assert same["seed"]["calls"] == same["new"]["calls"]


# The fleet-size test: in the normal suite on purpose, ~3 s (20,000 devices,
# no generated events, no latency), because it is the point of count_by.
def test_at_20000_devices_question_1_takes_2_calls_under_12000_characters_where_the_seed_way_takes_over_40():
    size = context_benchmark.measure(20_000, 0, 0.0)
    first = size["questions"][0]
    assert first["new"]["calls"] == 2 and first["new"]["chars"] < 12_000, first["new"]
    # 40 pages of 500 would fit no result cap: the seed way reads pages cut to fit, every one.
    assert first["seed"]["calls"] > 40, first["seed"]
    assert first["seed"]["facts"] == first["new"]["facts"] == {"devices": 20_000, "offline": size["fleet"]["offline"]}
    assert first["seed"]["errors"] == first["new"]["errors"] == []


def test_the_readme_table_has_the_figures_the_command_next_to_it_gives_but_for_time():
    # Calls, requests and characters do not depend on the machine: a run without latency gives the README's.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    shown = {(row[0], row[1]): row[2:8] for row in map(cells, readme.splitlines())
             if len(row) == 12 and row[0][:1].isdigit()}
    assert len(shown) == 14
    for size in (context_benchmark.measure(50, 1000, 0.0), context_benchmark.measure(20_000, 30_000, 0.0)):
        for number, row in enumerate(size["questions"], 1):
            fleet = "%s devices, %s events" % (format(size["devices"], ","), format(size["events"], ","))
            seed, new = row["seed"], row["new"]
            assert shown["%d. %s" % (number, row["question"]), fleet] == [format(n, ",") for n in (
                seed["calls"], new["calls"], seed["requests"], new["requests"], seed["chars"], new["chars"])]
