#!/usr/bin/env python3
"""Checks the relative links and anchors of the project's markdown: README.md, CHANGELOG.md, docs/**/*.md.

    python tools/check_docs.py [ROOT]      # ROOT: the repository root (default: this file's parent's parent)

Every relative link and image - ``[x](path)``, ``[x](path#anchor)``, ``[x](#anchor)``, ``![x](img)``,
reference definitions ``[x]: path`` and HTML ``<img src=...>`` / ``<a href=...>`` - must name a file or
folder inside ROOT, and an anchor into a markdown page must match one of that page's headings under
GitHub's slug rules (the rendered heading text, lowercased, punctuation other than ``-`` and ``_``
removed, each space turned into ``-``, the n-th repeat of a slug suffixed ``-n``) or an explicit
``id=``/``name=`` in its HTML. Links inside fenced code blocks and inline code are not links and are
skipped, as are URLs with a scheme (``http:``, ``https:``, ``mailto:``, ...): nothing here touches the
network. Each broken link prints one line ``file:line: target (why)`` and the exit status is 1;
otherwise one summary line is printed and the exit status is 0.

Why this and not mkdocs (or another site generator): it needs no package from the network, so CI runs
it with the standard library of any Python >= 3.8, and it checks exactly the markdown that GitHub
renders, where mkdocs would check its own rendering of it (with its own anchor rules and its own view of
links that leave docs/).
"""

import os
import re
import sys
from typing import Dict, List, Optional, Set, Tuple
from urllib.parse import unquote

FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})(.*)$")
ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# the target of an inline link or image, right after "](": <target> or a run without spaces, then a title
LINK_TARGET = re.compile(r"\]\(\s*(<[^>\n]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REF_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HTML_LINK = re.compile(r"<(?:img|a|source)\b[^>]*?\b(?:src|href)\s*=\s*(\"[^\"]*\"|'[^']*'|[^\s>]+)", re.I)
HTML_ID = re.compile(r"<[a-z][^>]*?\b(?:id|name)\s*=\s*(\"[^\"]*\"|'[^']*'|[^\s>]+)", re.I)
SCHEME = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)")
# what GitHub removes from a heading's text to make its slug: everything but letters, digits, marks,
# "_", "-" and spaces (\w covers letters, digits and "_")
NOT_SLUG = re.compile(r"[^\w\- ]", re.UNICODE)


def markdown_files(root: str) -> List[str]:
    """README.md, CHANGELOG.md and docs/**/*.md that exist under root, as paths relative to it."""
    found = [name for name in ("README.md", "CHANGELOG.md") if os.path.isfile(os.path.join(root, name))]
    docs = os.path.join(root, "docs")
    for folder, dirs, files in os.walk(docs):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".md"):
                found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return found


def prose_lines(text: str, blank_code: bool = True) -> List[Tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks, inline code blanked out unless
    blank_code is False."""
    out = []
    fence = None  # the opening fence's character and length while inside a block
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None:
            if m:
                fence = (m.group(1)[0], len(m.group(1)))
                continue
        else:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= fence[1] and not m.group(2).strip():
                fence = None
            continue
        out.append((number, INLINE_CODE.sub(lambda c: " " * len(c.group(0)), line) if blank_code else line))
    return out


def heading_text(raw: str) -> str:
    """The text GitHub renders for a heading's source: code spans keep their content verbatim; outside
    them links keep their text, images their alt text, and emphasis markers and HTML tags go."""
    parts = []
    last = 0
    for c in INLINE_CODE.finditer(raw):
        parts.append(_rendered(raw[last : c.start()]))
        parts.append(c.group(2).strip())
        last = c.end()
    parts.append(_rendered(raw[last:]))
    return "".join(parts).strip()


def _rendered(text: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"!?\[([^\]]*)\]\[[^\]]*\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"(\*+|(?<!\w)_+|_+(?!\w))", "", text)


def slug(text: str) -> str:
    return NOT_SLUG.sub("", text.lower()).replace(" ", "-")


def anchors(text: str) -> Set[str]:
    """Every anchor GitHub gives a markdown page: heading slugs (repeats suffixed -1, -2, ...) and HTML ids."""
    found: Set[str] = set()
    seen: Dict[str, int] = {}

    def add(title: str) -> None:
        base = slug(heading_text(title))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else "%s-%d" % (base, n))

    previous: Optional[str] = None
    for _, line in prose_lines(text, blank_code=False):
        m = ATX_HEADING.match(line)
        if m:
            add(m.group(2) or "")
            previous = None
            continue
        if (
            previous is not None
            and previous.strip()
            and SETEXT_UNDERLINE.match(line)
            and not re.match(r"^\s*([-*+>|]|\d+[.)])\s", previous)
            and not previous.lstrip().startswith("|")
        ):
            add(previous.strip())
            previous = None
            continue
        for m in HTML_ID.finditer(INLINE_CODE.sub("", line)):
            found.add(m.group(1).strip("\"'"))
        previous = line
    return found


def links(text: str) -> List[Tuple[int, str]]:
    """(line number, target) of every link and image in the page's prose."""
    out = []
    for number, line in prose_lines(text):
        for m in LINK_TARGET.finditer(line):
            if "[" in line[: m.start()]:
                out.append((number, m.group(1)))
        m = REF_DEFINITION.match(line)
        if m:
            out.append((number, m.group(1)))
        for m in HTML_LINK.finditer(line):
            out.append((number, m.group(1).strip("\"'")))
    return out


def check_link(root: str, page: str, target: str, cache: Dict[str, Set[str]]) -> Optional[str]:
    """Why the link `target` on `page` (relative to root) is broken, or None."""
    target = target.strip()
    if target.startswith("<") and target.endswith(">"):
        target = target[1:-1]
    if not target:
        return "empty link"
    if SCHEME.match(target):
        return None
    path, _, anchor = target.partition("#")
    path = unquote(path.split("?", 1)[0])
    if path:
        base = root if path.startswith("/") else os.path.dirname(os.path.join(root, page))
        full = os.path.normpath(os.path.join(base, path.lstrip("/")))
        if os.path.relpath(full, root).split(os.sep)[0] == "..":
            return "outside the repository"
        if not os.path.exists(full):
            return "no such file"
    else:
        full = os.path.join(root, page)
    if not anchor or not full.endswith(".md") or os.path.isdir(full):
        return None  # anchors into other files (#L10 on code) are GitHub's own
    if full not in cache:
        with open(full, encoding="utf-8") as f:
            cache[full] = anchors(f.read())
    if unquote(anchor) not in cache[full]:
        return "no heading '%s' in %s" % (anchor, os.path.relpath(full, root).replace(os.sep, "/"))
    return None


def check(root: str) -> Tuple[List[str], int, int]:
    """(one line per broken link, number of pages, number of links checked)."""
    root = os.path.abspath(root)
    problems: List[str] = []
    cache: Dict[str, Set[str]] = {}
    pages = markdown_files(root)
    count = 0
    for page in pages:
        with open(os.path.join(root, page), encoding="utf-8") as f:
            text = f.read()
        for number, target in links(text):
            if SCHEME.match(target.strip("<>").strip()):
                continue
            count += 1
            why = check_link(root, page, target, cache)
            if why:
                problems.append("%s:%d: %s (%s)" % (page, number, target, why))
    return problems, len(pages), count


def main(argv: List[str]) -> int:
    if len(argv) > 1 or (argv and argv[0] in ("-h", "--help")):
        print(__doc__.strip().splitlines()[0])
        print("usage: python tools/check_docs.py [ROOT]")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    root = argv[0] if argv else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(root):
        print("check_docs: %s is not a folder" % root)
        return 2
    problems, pages, count = check(root)
    for line in problems:
        print(line)
    if problems:
        return 1
    print("check_docs: %d relative links and anchors in %d pages, all resolve" % (count, pages))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
