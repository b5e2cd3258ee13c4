"""The README's code blocks, read out of README.md (for the tests that run
its examples as written; only the URL is changed to the test broker's)."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
README_URL = "pybroker://127.0.0.1:7420"


def section(title: str) -> str:
    """The README's text under the heading ``title``, to the next heading
    of the same or a higher level (lines in code blocks are not headings)."""
    heading = re.compile(r"^(#+) (.*?)\s*$")
    fenced = False
    level = 0
    out: list[str] = []
    for line in README.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        found = None if fenced else heading.match(line)
        if level:
            if found and len(found.group(1)) <= level:
                break
            out.append(line)
        elif found and found.group(2) == title:
            level = len(found.group(1))
    assert level, f"README has no section {title!r}"
    return "".join(out)


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def with_url(code: str, url: str) -> str:
    assert README_URL in code, "the README example no longer names the default URL"
    return code.replace(README_URL, url)
