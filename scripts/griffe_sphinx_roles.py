"""Griffe extension for the docs site: Sphinx cross-reference roles in docstrings as Markdown code.

The docstrings use Sphinx roles (``:class:`~lightning_freeze.FreezeBackbone```); mkdocstrings renders
Markdown, where they would show up verbatim. ``:role:`~a.b.C``` becomes ```C``` and ``:role:`a.b.C```
becomes ```a.b.C```, as Sphinx displays them. Loaded by ``mkdocs.yml`` (mkdocstrings ``extensions``).
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|mod|attr|data|exc|obj|const):`(~?)([^`]+)`")


def _display(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def strip_roles(text: str) -> str:
    """Replace every Sphinx cross-reference role in ``text`` by a Markdown code span."""
    return _ROLE.sub(_display, text)


class SphinxRoles(Extension):
    """Rewrites each object's docstring once it is loaded."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = strip_roles(obj.docstring.value)
