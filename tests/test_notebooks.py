"""The four lessons (docs/lessons/lesson*.md) fit their time and agree with exercises.md,
and each one runs as a Jupyter notebook.

- Each lesson's in-class timeline is contiguous from minute 0 and ends by minute 90.
- Its pre-reading word count, as stated on the page, is what the linked sections hold
  (every word of each section, code included), and at most 5,000.
- Every exercise a lesson names (in class or homework) exists, none is named twice, and
  the lesson names exactly the exercises exercises.md lists under that lesson.
- docs/README.md's lesson plan links every lesson.
- Each lesson converts with jupytext and executes with nbclient (skipped when jupytext,
  nbclient or an ipykernel is missing; see tests/requirements-reference.txt).

Word counts: python tests/test_notebooks.py
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
LESSONS = sorted((DOCS / "lessons").glob("lesson[0-9].md"))
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
LINK = re.compile(r"\[([^\]]+)\]\(([^)#\s]+)(?:#([^)\s]+))?\)")
MAX_MINUTES, MAX_WORDS = 90, 5000


def slug(heading: str) -> str:
    """GitHub's anchor for a heading (as tests/test_docs.py computes it)."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def headings(path: Path) -> list[tuple[int, int, str]]:
    """(line index, level, anchor) of every heading outside code blocks."""
    out, in_code = [], False
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code and re.match(r"#{1,6}\s", line):
            out.append((i, len(line) - len(line.lstrip("#")), slug(line.lstrip("#"))))
    return out


def section(path: Path, anchor: str | None) -> str:
    """The text of the section `anchor` (its heading to the next heading of the same or a
    higher level); the whole file when anchor is None."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if anchor is None:
        return "\n".join(lines)
    found = headings(path)
    for j, (i, level, a) in enumerate(found):
        if a == anchor:
            end = next((k for k, lv, _ in found[j + 1:] if lv <= level), len(lines))
            return "\n".join(lines[i:end])
    raise KeyError(f"{path.relative_to(ROOT)}: no heading #{anchor}")


def part(lesson: Path, name: str) -> str:
    """The text under the lesson's `## name` heading."""
    return section(lesson, slug(name))


def reading_words(lesson: Path) -> int:
    total = 0
    for _, target, anchor in LINK.findall(part(lesson, "Pre-reading")):
        if target.endswith(".md"):
            total += len(section((lesson.parent / target).resolve(), anchor or None).split())
    return total


def stated_words(lesson: Path) -> int:
    m = re.search(r"\(about ([\d,]+) words", part(lesson, "Pre-reading"))
    assert m, f"{lesson.name}: the pre-reading states no word count"
    return int(m.group(1).replace(",", ""))


def timeline(lesson: Path) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in re.findall(r"^\|\s*(\d+)-(\d+)\s*\|", part(lesson, "In class"), re.M)]


def named_exercises(text: str, base: Path) -> list[str]:
    """Exercise ids named by links in `text`: "exercises.md#<anchor>" or "<page> E<n>"."""
    ids = []
    for label, target, anchor in LINK.findall(text):
        page = (base / target).resolve().relative_to(DOCS).as_posix()
        if page == "exercises.md" and anchor:
            ids.append(f"exercises.md#{anchor}")
        else:
            m = re.search(r"\bE(\d+)\b", label)
            if m:
                ids.append(f"{page} E{m.group(1)}")
    return ids


def lesson_exercises(lesson: Path) -> list[str]:
    return (named_exercises(part(lesson, "Exercises in class"), lesson.parent)
            + named_exercises(part(lesson, "Homework"), lesson.parent))


def exercises_md_lesson(n: int) -> set[str]:
    """What exercises.md lists under "## Lesson n": its own ### exercises and the page ones."""
    path = DOCS / "exercises.md"
    anchor = next(a for _, lv, a in headings(path) if lv == 2 and a.startswith(f"lesson-{n}-"))
    text = section(path, anchor)
    own = {f"exercises.md#{slug(h)}" for h in re.findall(r"^### (.+)$", text, re.M)}
    return own | set(named_exercises(text.split("\n### ")[0], DOCS))


def exercise_exists(ex: str) -> bool:
    if ex.startswith("exercises.md#"):
        return ex.split("#", 1)[1] in {a for _, _, a in headings(DOCS / "exercises.md")}
    page, number = ex.rsplit(" ", 1)
    try:
        text = section(DOCS / page, "exercises")
    except KeyError:
        return False
    return f"**{number}." in text


def test_there_are_four_lessons_and_the_readme_links_each():
    assert [p.name for p in LESSONS] == [f"lesson{i}.md" for i in range(1, 5)]
    plan = section(DOCS / "README.md", "lesson-plan")
    for lesson in LESSONS:
        assert f"lessons/{lesson.name}" in plan, lesson.name


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.stem)
def test_timeline_is_contiguous_and_fits_90_minutes(lesson):
    spans = timeline(lesson)
    assert spans and spans[0][0] == 0, spans
    assert all(b > a for a, b in spans), spans
    assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1)), f"gap or overlap: {spans}"
    assert sum(b - a for a, b in spans) <= MAX_MINUTES


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.stem)
def test_pre_reading_word_count_is_stated_right_and_small(lesson):
    words = reading_words(lesson)
    # the page states it to the nearest hundred ("about 3,700 words"), so a small edit to a
    # linked section does not make it false
    assert stated_words(lesson) == round(words, -2), \
        f"{lesson.name}: the page says {stated_words(lesson)}, the sections hold {words}"
    assert words <= MAX_WORDS


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_lesson_names_exactly_the_exercises_of_exercises_md(n):
    lesson = DOCS / "lessons" / f"lesson{n}.md"
    named = lesson_exercises(lesson)
    assert len(named) == len(set(named)), f"named twice: {sorted(x for x in named if named.count(x) > 1)}"
    missing = [ex for ex in named if not exercise_exists(ex)]
    assert not missing, f"{lesson.name} names exercises that do not exist: {missing}"
    listed = exercises_md_lesson(n)
    assert set(named) == listed, (f"only in {lesson.name}: {sorted(set(named) - listed)}; "
                                  f"only in exercises.md: {sorted(listed - set(named))}")


# ---------------------------------------------------------------------------- notebooks


def kernel_available() -> str | None:
    """Why the notebooks cannot run here, or None when they can."""
    for module in ("jupytext", "nbclient", "nbformat", "ipykernel"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -r tests/requirements-reference.txt)"
    from jupyter_client.kernelspec import KernelSpecManager
    if "python3" not in KernelSpecManager().find_kernel_specs():
        return "no python3 Jupyter kernel (python -m ipykernel install --user)"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.stem)
def test_lesson_runs_as_a_notebook(lesson, monkeypatch, tmp_path):
    reason = kernel_available()
    if reason:
        pytest.skip(reason)
    import jupytext
    from nbclient import NotebookClient

    notebook = jupytext.read(lesson)
    assert sum(c.cell_type == "code" for c in notebook.cells) >= 1
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    t0 = time.perf_counter()
    NotebookClient(notebook, timeout=60, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert time.perf_counter() - t0 < 30, "a lesson notebook should run in seconds"


if __name__ == "__main__":
    for lesson in LESSONS:
        print(f"{lesson.name}: pre-reading {reading_words(lesson):,} words, in class "
              f"{sum(b - a for a, b in timeline(lesson))} minutes, "
              f"{len(named_exercises(part(lesson, 'Exercises in class'), lesson.parent))} exercises in class, "
              f"{len(named_exercises(part(lesson, 'Homework'), lesson.parent))} for homework")
    sys.exit(0)
