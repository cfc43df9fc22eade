"""The documentation points at code and files that exist.

* Every code reference ``path.py::Name`` or ``path.py::Class.method`` in docs/METHODS.md and
  docs/ARCHITECTURE.md names a file of the repository (path relative to the repository root)
  that defines ``Name`` at top level (a def, a class or an assignment, also inside a top-level
  ``if``/``try``/``with`` block), or a class ``Class`` whose body defines ``method`` (a def, a
  nested class or a class attribute).
* Every relative Markdown link or image in README.md and docs/*.md points to an existing path
  inside the repository (no ``../shared/...``, no absolute paths). External links (``http:``,
  ``mailto:``, ...) and in-page anchors are not checked; text in code spans and code blocks is
  not a link.

Pure text and ``ast`` parsing: nothing is imported from the library.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[2]
DOCS_WITH_REFERENCES = ("docs/METHODS.md", "docs/ARCHITECTURE.md")

# e.g. pipeline_lib/math/bon.py::bon_curve, pipeline_lib/math/ppo_math.py::FixedKLController.update
CODE_REF = re.compile(
    r"(?P<path>[A-Za-z0-9_.][A-Za-z0-9_./-]*\.py)::(?P<name>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)"
)
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)
# [text](target "title") and ![alt](target); link text may hold one level of brackets
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(?P<target><[^>]*>|[^\s()]*)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(?P<target><[^>]*>|\S+)", re.M)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _strip_code(text: str) -> str:
    """Code blocks and code spans blanked out (newlines kept, so line numbers stay right)."""
    blank = lambda m: re.sub(r"[^\n]", " ", m.group(0))  # noqa: E731
    return CODE_SPAN.sub(blank, FENCE.sub(blank, text))


def _assigned_names(target: ast.expr) -> set[str]:
    if isinstance(target, ast.Name):
        return {target.id}
    if isinstance(target, (ast.Tuple, ast.List)):
        return set().union(*(_assigned_names(t) for t in target.elts))
    if isinstance(target, ast.Starred):
        return _assigned_names(target.value)
    return set()


def _definitions(body: list[ast.stmt]) -> dict[str, ast.stmt]:
    """Names defined by a block: defs, classes and assignments, looking into if/try/with."""
    out: dict[str, ast.stmt] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                out.update(dict.fromkeys(_assigned_names(target), node))
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            out.update(dict.fromkeys(_assigned_names(node.target), node))
        elif isinstance(node, ast.If):
            out.update(_definitions(node.body))
            out.update(_definitions(node.orelse))
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            out.update(_definitions(node.body))
        elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
            for block in (node.body, node.orelse, node.finalbody,
                          *(h.body for h in node.handlers)):
                out.update(_definitions(block))
    return out


def find_code_references(text: str) -> list[tuple[int, str, str]]:
    """(line, path, name) of every ``path.py::Name`` in ``text``."""
    return [(_line(text, m.start()), m["path"], m["name"]) for m in CODE_REF.finditer(text)]


def check_code_reference(path: str, name: str, root: Path = ROOT,
                         cache: dict[Path, dict[str, ast.stmt] | str] | None = None) -> str | None:
    """None if ``path`` (relative to ``root``) defines ``name``, else why not."""
    cache = {} if cache is None else cache
    file = root / path
    try:
        file.resolve().relative_to(root.resolve())
    except ValueError:
        return "path leaves the repository"
    if not file.is_file():
        return "no such file"
    if file not in cache:
        try:
            cache[file] = _definitions(ast.parse(file.read_text(encoding="utf-8"), str(file)).body)
        except SyntaxError as exc:
            cache[file] = f"cannot parse the file ({exc.msg}, line {exc.lineno})"
    defs = cache[file]
    if isinstance(defs, str):
        return defs
    head, _, member = name.partition(".")
    if head not in defs:
        return f"no top-level def, class or assignment named {head!r}"
    if member:
        node = defs[head]
        if not isinstance(node, ast.ClassDef):
            return f"{head!r} is not a class, so it has no method {member!r}"
        if member not in _definitions(node.body):
            return f"class {head!r} defines no method or attribute {member!r}"
    return None


def find_relative_links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every relative link or image outside code; anchors and URLs skipped."""
    plain = _strip_code(text)
    found = [(m.start(), m["target"]) for m in INLINE_LINK.finditer(plain)]
    found += [(m.start(), m["target"]) for m in REFERENCE_DEF.finditer(plain)]
    out = []
    for pos, target in sorted(found):
        target = target.strip().removeprefix("<").removesuffix(">").strip()
        if not target or target.startswith("#") or target.startswith("//") or SCHEME.match(target):
            continue
        out.append((_line(plain, pos), target))
    return out


def check_link(doc: Path, target: str, root: Path = ROOT) -> str | None:
    """None if the relative link ``target`` of ``doc`` reaches an existing path in ``root``."""
    path = unquote(re.split(r"[#?]", target, maxsplit=1)[0])
    if not path:
        return None  # "?query" or "#anchor" on the page itself
    if path.startswith("/"):
        return "absolute path; link relative to the Markdown file"
    resolved = (doc.parent / path).resolve()
    try:
        resolved.relative_to(root.resolve())
    except ValueError:
        return f"points outside the repository ({resolved})"
    if not resolved.exists():
        return "no such file"
    return None


# ---------------------------------------------------------------------------------------------
# the checks of the repository's documentation
# ---------------------------------------------------------------------------------------------
def test_documented_code_references_exist():
    missing_docs = [d for d in DOCS_WITH_REFERENCES if not (ROOT / d).is_file()]
    assert not missing_docs, f"documentation files missing: {missing_docs}"
    cache: dict = {}
    broken, total = [], 0
    for doc in DOCS_WITH_REFERENCES:
        text = (ROOT / doc).read_text(encoding="utf-8")
        for line, path, name in find_code_references(text):
            total += 1
            why = check_code_reference(path, name, ROOT, cache)
            if why:
                broken.append(f"{doc}:{line}: {path}::{name} -- {why}")
    assert total >= 20, f"only {total} code references found in {DOCS_WITH_REFERENCES}"
    assert not broken, (f"{len(broken)} of {total} code references are broken:\n  "
                        + "\n  ".join(broken))


def test_relative_markdown_links_exist():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        for line, target in find_relative_links(text):
            why = check_link(doc, target, ROOT)
            if why:
                broken.append(f"{doc.relative_to(ROOT)}:{line}: ({target}) -- {why}")
    assert not broken, f"{len(broken)} broken relative links:\n  " + "\n  ".join(broken)


# ---------------------------------------------------------------------------------------------
# the checkers themselves, on a throw-away repository
# ---------------------------------------------------------------------------------------------
def test_checkers_catch_what_they_should(tmp_path):
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "pkg" / "mod.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "X: int = 1\n"
        "A, (B, C) = 1, (2, 3)\n"
        "if TYPE_CHECKING:\n    T = int\n"
        "try:\n    import numpy\nexcept ImportError:\n    def fallback(): pass\n"
        "def f(): pass\n"
        "class K:\n    attr = 1\n    def m(self): pass\n    @property\n    def p(self): pass\n"
    )
    for name in ("X", "A", "C", "T", "fallback", "f", "K", "K.m", "K.p", "K.attr"):
        assert check_code_reference("pkg/mod.py", name, root) is None, name
    assert "no such file" in check_code_reference("pkg/nope.py", "f", root)
    assert "named 'g'" in check_code_reference("pkg/mod.py", "g", root)
    assert "no method" in check_code_reference("pkg/mod.py", "f.x", root)
    assert "'q'" in check_code_reference("pkg/mod.py", "K.q", root)
    assert check_code_reference("pkg/mod.py", "numpy", root) is not None  # imports do not count
    assert "leaves" in check_code_reference("../outside.py", "f", root)

    refs = find_code_references("see `pkg/mod.py::K.m` and pkg/mod.py::f, not pkg/mod.py:f")
    assert [(p, n) for _, p, n in refs] == [("pkg/mod.py", "K.m"), ("pkg/mod.py", "f")]

    doc = root / "docs" / "page.md"
    doc.write_text(
        "[ok](../pkg/mod.py) ![img](../pkg/mod.py#L1) [web](https://example.org) [a](#top)\n"
        "`[code](nope.md)`\n```\n[block](nope.md)\n```\n"
        "[shared](../../shared/design/METHODS.md) [gone](missing.md) [abs](/etc/passwd)\n"
        "[ref]: ../pkg/mod.py\n"
    )
    links = find_relative_links(doc.read_text())
    assert [t for _, t in links] == ["../pkg/mod.py", "../pkg/mod.py#L1",
                                     "../../shared/design/METHODS.md", "missing.md",
                                     "/etc/passwd", "../pkg/mod.py"]
    verdicts = {t: check_link(doc, t, root) for _, t in links}
    assert verdicts["../pkg/mod.py"] is None and verdicts["../pkg/mod.py#L1"] is None
    assert "outside" in verdicts["../../shared/design/METHODS.md"]
    assert "no such file" in verdicts["missing.md"]
    assert "absolute" in verdicts["/etc/passwd"]

