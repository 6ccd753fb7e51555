#!/usr/bin/env python3
r"""An mdBook preprocessor: the book's TeX becomes MathML at build time, so no page needs a script
or a network to show its formulas (current browsers draw MathML natively).

Math is written as mdBook's MathJax support wants it, escaped for Markdown: \\( ... \\) inline
and \\[ ... \\] on its own. Markdown's backslash escapes are undone first (\\, is \, and \_ is _),
which is what MathJax saw in the rendered page, so the TeX means what it meant before. Fenced
code and inline code are left alone. A formula latex2mathml cannot read stops the build with
the page and the formula.

    mdbook build book      (book.toml runs this; needs `pip install latex2mathml`)
"""
import html
import json
import re
import sys

TOKEN = re.compile(
    r"(?P<fence>^[ \t]*(?P<mark>`{3,}|~{3,})[^\n]*\n.*?^[ \t]*(?P=mark)[`~]*[ \t]*$)"
    r"|(?P<code>(?P<ticks>`+).+?(?P=ticks))"
    r"|\\\\\[(?P<display>.+?)\\\\\]"
    r"|\\\\\((?P<inline>.+?)\\\\\)",
    re.S | re.M,
)
MARKDOWN_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")
TEXT = re.compile(r">([^<]+)<")


def mathml(tex, display):
    from latex2mathml.converter import convert

    out = convert(MARKDOWN_ESCAPE.sub(r"\1", tex).strip(), display="block" if display else "inline")
    # One line, and every character of the text between tags an entity, so that Markdown reads
    # none of it (a | would end a table cell, a * or _ start emphasis).
    out = out.replace("\n", " ")
    return TEXT.sub(lambda m: ">" + "".join(c if c.isalnum() or c == " " else f"&#{ord(c)};" for c in html.unescape(m.group(1))) + "<", out)


def render(content, where):
    def one(m):
        tex, display = (m.group("display"), True) if m.group("display") is not None else (m.group("inline"), False)
        if tex is None:
            return m.group(0)
        try:
            return mathml(tex, display)
        except Exception as e:  # latex2mathml raises several types, none of them documented
            raise SystemExit(f"mathml: {where}: cannot convert {tex!r}: {type(e).__name__}: {e}")

    return TOKEN.sub(one, content)


def walk(items):
    for item in items:
        chapter = item.get("Chapter") if isinstance(item, dict) else None
        if chapter:
            chapter["content"] = render(chapter["content"], chapter.get("source_path") or chapter.get("name"))
            walk(chapter.get("sub_items", []))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "supports":
        sys.exit(0 if sys.argv[2] == "html" else 1)
    try:
        import latex2mathml  # noqa: F401
    except ImportError:
        raise SystemExit("mathml: needs latex2mathml: python3 -m pip install 'latex2mathml==3.81.1'")
    _context, book = json.load(sys.stdin)
    walk(book.get("items", book.get("sections", [])))
    json.dump(book, sys.stdout)


if __name__ == "__main__":
    main()
