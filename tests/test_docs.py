"""The docs are part of the code: every snippet runs, every code reference resolves.

- Every ```python block of every Markdown file under docs/ (and README.md at the repository
  root) runs in a fresh interpreter, in an empty temporary directory, with src/ on the
  path: one test per block, named file:line, failing with the block's stderr.
- Every `src/...py` / `tests/...py` path a page mentions exists, and every name it points
  at resolves in that file (by parsing it, nothing is imported). The convention of the
  walkthrough pages is `src/transferlab/model.py::GPT.backward`; the older forms
  "`GPT.backward` in `src/transferlab/model.py`" and "`src/transferlab/model.py`
  (`GPT.backward`, ...)" are checked as well.
- Every `pytest tests/...py -k EXPR` a page tells the reader to run selects at least one
  test.
- Every link to a page (`[text](other.md#anchor)`, `docs/page.md#anchor`), in the docs and
  in the docstrings and comments of src/, points at a file and heading that exist.
- docs/API.md: every signature it shows matches the code's parameters and defaults, and
  it lists exactly the command-line flags src/main.py defines.

Run: python -m pytest tests/test_docs.py -q -p no:cacheprovider --no-cov
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DOCS = ROOT / "docs"
BLOCK_TIMEOUT = 60  # seconds per snippet


def markdown_files() -> list[Path]:
    files = sorted(DOCS.rglob("*.md"))
    if (ROOT / "README.md").exists():
        files.append(ROOT / "README.md")
    return files


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ---------------------------------------------------------------------------- snippets

FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})\s*([\w+-]*)")


def code_blocks(path: Path, language: str = "python") -> list[tuple[int, str]]:
    """(line number of the opening fence, code) for every fenced block in `language`."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1  # the closing fence
        if lang.lower() == language:
            blocks.append((start, "\n".join(body) + "\n"))
    return blocks


SNIPPETS = {f"{rel(path)}:{line}": code for path in markdown_files() for line, code in code_blocks(path)}
WORKERS = max(2, min(4, os.cpu_count() or 1))  # snippets mostly wait on interpreter start-up


def run_snippet(code: str):
    """Run one block as a script: fresh interpreter, empty directory, src/ on the path.
    Returns (exit status, stderr), or None when it ran out of time."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["MPLBACKEND"] = "Agg"
    # one BLAS thread: several snippets run side by side, and OpenBLAS threads spinning on
    # tiny matrices only slow a shared machine down (the numbers do not depend on it)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="docs-snippet-") as tmp:
        script = Path(tmp) / "snippet.py"
        script.write_text(code, encoding="utf-8")
        try:
            done = subprocess.run([sys.executable, str(script)], cwd=tmp, env=env, capture_output=True,
                                  text=True, timeout=BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired:
            return None
    return done.returncode, done.stderr


@pytest.fixture(scope="session")
def snippet_results(request):
    """Start every selected snippet up front on a small pool of threads, each block in its own
    process, so the blocks run side by side; each test then waits for its own result."""
    selected = [item.callspec.params["where"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_snippet_runs"]
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    futures = {where: pool.submit(run_snippet, SNIPPETS[where]) for where in selected}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


# a snippet that takes more than about a second says so on its first line (`# slow: why`),
# so the mark moves with it when its page is edited; the quick loop (-m "not slow") skips it
SLOW_SNIPPETS = {where for where, code in SNIPPETS.items() if code.lstrip().startswith("# slow")}


@pytest.mark.parametrize("where", [pytest.param(w, marks=pytest.mark.slow) if w in SLOW_SNIPPETS else w
                                   for w in SNIPPETS], ids=list(SNIPPETS))
def test_snippet_runs(where, snippet_results):
    """The block runs on its own: fresh interpreter, empty directory, src/ on the path."""
    outcome = snippet_results[where].result()
    if outcome is None:
        pytest.fail(f"{where}: the snippet ran longer than {BLOCK_TIMEOUT} s", pytrace=False)
    status, stderr = outcome
    if status != 0:
        pytest.fail(f"{where}: the snippet failed (exit status {status}):\n{stderr}", pytrace=False)


def test_the_slow_snippets_are_the_marked_ones():
    """The long snippet (the API tour: it pretrains and runs two strategies) carries its mark."""
    tour = [w for w, code in SNIPPETS.items() if w.startswith("docs/API.md") and "run(" in code]
    assert tour and set(tour) <= SLOW_SNIPPETS


# ---------------------------------------------------------------------------- code references

PATH = r"(?:src|tests)/[\w/.-]*?\w\.py"
NAME = r"[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*"
# src/transferlab/model.py::GPT.backward  (also tests/test_model.py::test_x[param])
DOUBLE_COLON = re.compile(rf"({PATH})::\s*({NAME})")
# `GPT.backward` in `src/transferlab/model.py`   (the name may carry a call: `f(x, y)`)
NAME_IN_PATH = re.compile(rf"`({NAME})(?:\([^`]*\))?`\s+in\s+`({PATH})`")
# `src/transferlab/model.py` (`GPT.backward`, `GPT.set_head`, ...)   (source files only: after a
# test file the parentheses describe what it checks, in prose)
PATH_THEN_NAMES = re.compile(r"`(src/[\w/.-]*?\w\.py)`\s*\(([^()]*(?:\([^()]*\)[^()]*)*)\)")
ANY_PATH = re.compile(rf"(?<![\w/.-])({PATH})(?![\w/])")


@lru_cache(maxsize=None)
def defined_names(path: str) -> frozenset[str]:
    """Every dotted name a file defines: functions, classes, their methods and attributes,
    module-level and class-level assignments (dataclass fields included)."""
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    names = set()

    def visit(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(prefix + node.name)
                if isinstance(node, ast.ClassDef):
                    visit(node.body, prefix + node.name + ".")
                elif node.name == "__init__":  # self.x = ... attributes
                    for sub in ast.walk(node):
                        if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) \
                                and sub.value.id == "self" and isinstance(sub.ctx, ast.Store):
                            names.add(prefix + sub.attr)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    for sub in ast.walk(target):
                        if isinstance(sub, ast.Name):
                            names.add(prefix + sub.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(prefix + node.target.id)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body, prefix)

    visit(tree.body, "")
    return frozenset(names)


def references(text: str):
    """(line, path, name or None) for every code reference in a page's text."""
    def line_of(pos):
        return text.count("\n", 0, pos) + 1

    for m in ANY_PATH.finditer(text):
        yield line_of(m.start()), m.group(1), None
    for m in DOUBLE_COLON.finditer(text):
        yield line_of(m.start()), m.group(1), m.group(2)
    for m in NAME_IN_PATH.finditer(text):
        yield line_of(m.start()), m.group(2), m.group(1)
    for m in PATH_THEN_NAMES.finditer(text):
        for name in re.findall(rf"`({NAME})(?:\([^`]*\))?`", m.group(2)):
            yield line_of(m.start()), m.group(1), name


def unresolved(path: Path) -> list[str]:
    problems = []
    for line, file, name in references(path.read_text(encoding="utf-8")):
        if "*" in file:
            continue
        where = f"{rel(path)}:{line}"
        if not (ROOT / file).is_file():
            problems.append(f"{where}: {file} does not exist")
        elif name is not None and name not in defined_names(file):
            problems.append(f"{where}: {file} defines no {name!r}")
    return sorted(set(problems))


@pytest.mark.parametrize("page", markdown_files(), ids=rel)
def test_code_references_resolve(page):
    """Each path a page names exists; each function, class or method it names is there."""
    problems = unresolved(page)
    assert not problems, "\n".join(problems)


def test_reference_checker_catches_mistakes():
    """The checker itself can fail: a wrong name, a wrong path and a wrong test are caught."""
    text = ("`src/transferlab/model.py::GPT.backwards` and `src/transferlab/modle.py` and\n"
            "`layernorm_backward` in `src/transferlab/layers.py`, `src/transferlab/masks.py` "
            "(`freeze`, `freeze_everything`), `tests/test_model.py::test_nothing`")
    found = {(file, name) for _, file, name in references(text)}
    assert ("src/transferlab/model.py", "GPT.backwards") in found
    assert ("src/transferlab/layers.py", "layernorm_backward") in found
    assert ("src/transferlab/masks.py", "freeze_everything") in found
    assert "GPT.backward" in defined_names("src/transferlab/model.py")
    assert "GPT.backwards" not in defined_names("src/transferlab/model.py")
    assert "freeze_everything" not in defined_names("src/transferlab/masks.py")
    assert "test_nothing" not in defined_names("tests/test_model.py")
    assert not (ROOT / "src/transferlab/modle.py").exists()


# ---------------------------------------------------------------------------- pytest -k commands

# pytest tests/test_layers.py -k layernorm      (also `python -m pytest ...`, quotes allowed)
PYTEST_CMD = re.compile(r"pytest((?:\s+tests/[\w/.-]+\.py)+)((?:\s+-[\w-]+(?:\s+(?:\"[^\"]*\"|'[^']*'|[^\s`-][^\s`]*))?)*)")


def pytest_commands() -> list[tuple[str, tuple[str, ...], str]]:
    """(where, test files, -k expression) of every `pytest tests/... -k EXPR` in the docs."""
    found = []
    for path in markdown_files():
        text = path.read_text(encoding="utf-8")
        for m in PYTEST_CMD.finditer(text):
            k = re.search(r"-k\s+(\"[^\"]*\"|'[^']*'|[^\s`]+)", m.group(2))
            if k:
                line = text.count("\n", 0, m.start()) + 1
                expr = k.group(1).strip("\"'") if k.group(1)[0] in "\"'" else k.group(1).rstrip(".,;:)")
                found.append((f"{rel(path)}:{line}", tuple(m.group(1).split()), expr))
    return found


@lru_cache(maxsize=None)
def collected_ids(files: tuple[str, ...]) -> tuple[str, ...]:
    """The test ids pytest collects from these files (one collection run, no tests run)."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *files, "--collect-only", "-q", "-p", "no:cacheprovider",
         "-o", "addopts=", "-W", "ignore"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    ids = tuple(line.strip() for line in done.stdout.splitlines() if "::" in line)
    assert ids, f"pytest collected nothing from {files}:\n{done.stdout}\n{done.stderr}"
    return ids


def keyword_selects(expr: str, test_id: str) -> bool:
    """pytest's -k rule: case-insensitive substrings of the test name, its class or its module."""
    from _pytest.mark.expression import Expression

    file, _, rest = test_id.partition("::")
    names = [Path(file).name] + rest.split("::")
    return Expression.compile(expr).evaluate(lambda sub, **_: any(sub.lower() in n.lower() for n in names))


def test_every_cited_pytest_k_selects_a_test():
    """`pytest tests/test_layers.py -k layernorm` in a page must run something."""
    commands = pytest_commands()
    assert commands, "no `pytest tests/... -k ...` command found in the docs"
    files = tuple(sorted({f for _, fs, _ in commands for f in fs}))
    ids = collected_ids(files)
    # ids are relative to tests/ (where pytest.ini is), so files are compared by name
    empty = [f"{where}: pytest {' '.join(fs)} -k {expr!r} selects no test" for where, fs, expr in commands
             if not any(keyword_selects(expr, i) for i in ids
                        if Path(i.split("::")[0]).name in {Path(f).name for f in fs})]
    assert not empty, "\n".join(empty)


# ---------------------------------------------------------------------------- links between pages

MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
DOC_MENTION = re.compile(r"(?<![\w/.-])(docs/[\w/.-]*?\.md)(#[\w-]+)?")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    lines, in_code, found = path.read_text(encoding="utf-8").splitlines(), False, set()
    for line in lines:
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code and re.match(r"#{1,6}\s", line):
            found.add(slug(line.lstrip("#")))
    return frozenset(found)


def link_problems(source: Path, text: str) -> list[str]:
    problems = []
    targets = [(m.start(), m.group(1)) for m in MD_LINK.finditer(text)] if source.suffix == ".md" else []
    targets += [(m.start(), m.group(1) + (m.group(2) or "")) for m in DOC_MENTION.finditer(text)]
    for pos, target in targets:
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            if target.startswith("#") and target[1:] not in anchors(source):
                problems.append(f"{rel(source)}:{text.count(chr(10), 0, pos) + 1}: no heading {target}")
            continue
        file, _, anchor = target.partition("#")
        base = ROOT if file.startswith("docs/") else source.parent
        path = (base / file).resolve()
        where = f"{rel(source)}:{text.count(chr(10), 0, pos) + 1}"
        if not path.exists():
            problems.append(f"{where}: {target} does not exist")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            problems.append(f"{where}: {file} has no heading for #{anchor}")
    return sorted(set(problems), key=lambda p: (int(p.split(":")[1]), p))


LINK_SOURCES = markdown_files() + sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("source", LINK_SOURCES, ids=rel)
def test_links_resolve(source):
    """Links between pages, and docs/... mentions in the code, reach a real page and heading."""
    problems = link_problems(source, source.read_text(encoding="utf-8"))
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------- docs/API.md

API = DOCS / "API.md"
MODULE_HEADING = re.compile(r"^#+ .*?`((?:src)/[\w/]+\.py)`")
SIGNATURE = re.compile(rf"^({NAME})\((.*)\)(?:\s*->.*)?$")


def api_signatures() -> list[tuple[int, str, str, str]]:
    """(line, file, dotted name, parameter text) of each signature line in API.md's text
    blocks; the file is the one named by the nearest heading above."""
    found, module, in_text = [], None, False
    for n, line in enumerate(API.read_text(encoding="utf-8").splitlines(), 1):
        m = MODULE_HEADING.match(line)
        if m:
            module = m.group(1)
        if FENCE.match(line):
            in_text = not in_text and FENCE.match(line).group(3) == "text"
            continue
        sig = SIGNATURE.match(line.strip()) if in_text and module else None
        if sig:
            found.append((n, module, sig.group(1), sig.group(2)))
    return found


def _params_of(args: ast.arguments, drop_self: bool) -> list[tuple[str, str, str | None]]:
    """(kind, name, default source) for each parameter; annotations ignored."""
    out = []
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for a, d in zip(positional, defaults):
        out.append(("pos", a.arg, None if d is None else ast.unparse(d)))
    if args.vararg:
        out.append(("*", args.vararg.arg, None))
    elif args.kwonlyargs:
        out.append(("*", "", None))
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        out.append(("kw", a.arg, None if d is None else ast.unparse(d)))
    if args.kwarg:
        out.append(("**", args.kwarg.arg, None))
    if drop_self and out and out[0][1] in ("self", "cls"):
        out = out[1:]
    return out


def code_signature(file: str, dotted: str) -> list[tuple[str, str, str | None]]:
    """The parameters of a function, method, class (its __init__) or dataclass (its fields)."""
    node = ast.parse((ROOT / file).read_text(encoding="utf-8"))
    for part in dotted.split("."):
        body = node.body
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part), None)
        if node is None:
            raise LookupError(f"{file} defines no {dotted!r}")
    if isinstance(node, ast.FunctionDef):
        return _params_of(node.args, drop_self=True)
    init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    if init is not None:
        return _params_of(init.args, drop_self=True)
    fields = []  # a dataclass: its annotated fields, in order
    for n in node.body:
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and "ClassVar" not in ast.unparse(n.annotation) \
                and not (n.value is not None and "init=False" in ast.unparse(n.value)):
            fields.append(("pos", n.target.id, None if n.value is None else ast.unparse(n.value)))
    return fields


def same_default(doc: str | None, code: str | None) -> bool:
    if doc == code:
        return True
    if doc is None or code is None:
        return False
    if code.startswith("knob("):  # knob(default, doc, **rules): the default is its first argument
        code = ast.unparse(ast.parse(code, mode="eval").body.args[0])
    try:
        return ast.literal_eval(doc) == ast.literal_eval(code)
    except ValueError:  # field(default_factory=...) and other expressions: shown as a value
        return code.startswith("field(")


def test_api_signatures_match_the_code():
    """Every `name(params)` line in API.md's text blocks has the code's parameters and defaults."""
    sigs = api_signatures()
    assert len(sigs) >= 40, f"API.md shows only {len(sigs)} signatures"
    problems = []
    for line, file, dotted, params in sigs:
        try:
            doc = _params_of(ast.parse(f"def _({params}): pass").body[0].args, drop_self=True)
            code = code_signature(file, dotted)
        except (SyntaxError, LookupError) as err:
            problems.append(f"docs/API.md:{line}: {dotted}: {err}")
            continue
        names = lambda ps: [(k, n) for k, n, _ in ps]  # noqa: E731
        if names(doc) != names(code):
            problems.append(f"docs/API.md:{line}: {dotted}({params}) but the code has "
                            f"({', '.join(n for _, n, _ in code)})")
        for (_, name, d), (_, _, c) in zip(doc, code):
            if names(doc) == names(code) and not same_default(d, c):
                problems.append(f"docs/API.md:{line}: {dotted}: {name}={d} but the code says {name}={c}")
    assert not problems, "\n".join(problems)


def test_api_lists_exactly_the_cli_flags():
    sys.path.insert(0, str(SRC))
    try:
        from main import build_parser
    finally:
        sys.path.remove(str(SRC))
    flags = {s for action in build_parser()._actions for s in action.option_strings if s.startswith("--")}
    documented = set(re.findall(r"`(--[a-z][\w-]*)", API.read_text(encoding="utf-8")))
    assert flags - {"--help"} <= documented, f"flags missing from API.md: {sorted(flags - documented - {'--help'})}"
    assert documented <= flags, f"API.md documents flags main.py does not have: {sorted(documented - flags)}"
