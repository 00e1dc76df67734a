"""Split Python source into two domains, code and prose: the built-in domains of docs/btx.md.

``split_python_source(text)`` returns ``(code, prose)``. Every docstring and comment it moves
leaves the code and appears in the prose, so no text is in both. The definition (version
``SPLIT_VERSION``; bump it when the rules change, it is part of the corpus fingerprint):

- **Docstrings** (``ast``): the first statement of a module, class or (async) function body
  when it is a string literal. One that occupies whole lines (only whitespace before it on its
  first line, only whitespace or a comment after it on its last) is moved: its lines leave the
  code and its value, dedented by ``inspect.cleandoc``, becomes a prose paragraph. If it was the
  only statement of a class or function body, ``pass`` at its indentation takes its place, so
  the code still parses. A docstring sharing a line with code (``def f(): "doc"``) stays.
- **Comments** (``tokenize``): a line holding only a comment leaves the code; a trailing comment
  is cut together with the whitespace before it. The comment's text without its leading ``#``
  characters and surrounding whitespace goes to prose when it holds a letter or digit
  (decoration such as ``# ------`` is dropped from both). Comments on consecutive lines form one
  paragraph, one line each.
- Prose paragraphs follow source order, separated by a blank line.
- A file that ``ast`` or ``tokenize`` rejects (a few deliberately broken test files), or with
  a carriage return outside CRLF line ends, stays in code unchanged, with no prose.

Deterministic for a given interpreter: ``ast`` and ``tokenize`` are the running Python's, so
another Python version (another stdlib, another parser) gives other bytes.
"""

from __future__ import annotations

import ast
import functools
import inspect
import io
import tokenize
import warnings

SPLIT_VERSION = 1
_DOC_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _byte_col(line: str, col: int) -> str:
    """``line`` up to the UTF-8 byte offset ``col`` (ast columns count bytes, not characters)."""
    return line.encode("utf-8")[:col].decode("utf-8", errors="replace")


def _docstrings(tree: ast.Module, lines: list[str]):
    """(first line, last line (0-based), indentation, value, sole statement) of each docstring
    on lines of its own."""
    for node in ast.walk(tree):
        if not isinstance(node, _DOC_OWNERS) or not node.body:
            continue
        first = node.body[0]
        if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)):
            continue
        start, end = first.lineno - 1, first.end_lineno - 1
        before = _byte_col(lines[start], first.col_offset)
        after = lines[end].encode("utf-8")[first.end_col_offset:].decode("utf-8", errors="replace").strip()
        if before.strip() or (after and not after.startswith("#")):
            continue
        sole = len(node.body) == 1 and not isinstance(node, ast.Module)
        yield start, end, before, first.value.value, sole


@functools.lru_cache(maxsize=8192)
def split_python_source(text: str) -> tuple[str, str]:
    """(code, prose) of one Python file's text; see the module docstring for the rules.

    Cached, because the code and the prose domain each read every file (a stdlib pass costs
    ~20-40 s): ``prepare_data`` clears the cache once the shards are built."""
    if "\r" in text.replace("\r\n", ""):  # a lone CR ends a line for ast but not for readlines
        return text, ""
    lines = io.StringIO(text).readlines()  # the lines tokenize and ast number (CRLF stays in a line)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning (invalid escapes) of old files
            tree = ast.parse(text)
            tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (SyntaxError, ValueError, tokenize.TokenError, RecursionError):
        return text, ""
    code: list[str | None] = list(lines)  # None = line removed
    pieces: list[tuple[int, str, str]] = []  # (line, "doc" | "comment", text), sorted later
    docstring_rows: set[int] = set()
    for start, end, indent, value, sole in _docstrings(tree, lines):
        for i in range(start, end + 1):
            code[i] = None
            docstring_rows.add(i)
        if sole:
            code[start] = indent + "pass\n"
        pieces.append((start, "doc", inspect.cleandoc(value)))
    for tok in tokens:
        if tok.type != tokenize.COMMENT:
            continue
        row, col = tok.start[0] - 1, tok.start[1]
        if row not in docstring_rows:  # a docstring's trailing comment left with its lines
            line = lines[row]
            head, ending = line[:col], line[len(line.rstrip("\r\n")):]
            code[row] = head.rstrip() + ending if head.strip() else None
        words = tok.string.lstrip("#").strip()
        if any(ch.isalnum() for ch in words):
            pieces.append((row, "comment", words))
    paragraphs: list[str] = []
    last_comment_row = -2
    for row, kind, piece in sorted(pieces, key=lambda p: p[0]):
        if kind == "comment" and row == last_comment_row + 1 and paragraphs:
            paragraphs[-1] += "\n" + piece
        else:
            paragraphs.append(piece)
        last_comment_row = row if kind == "comment" else -2
    return "".join(line for line in code if line is not None), "\n\n".join(p for p in paragraphs if p)
