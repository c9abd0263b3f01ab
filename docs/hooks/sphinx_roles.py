"""A griffe extension for the docs build: Sphinx roles in docstrings become cross-references.

The package's docstrings name other objects the way ``help()`` readers know,
``:class:`EMAOptimizer```, ``:meth:`swap_ema```, ``:func:`~triton_ema.attach```.
mkdocstrings renders Markdown, so each role becomes an autorefs link
``[`text`][path]``, the path resolved from the docstring's own scope (the
object, then each enclosing class and module). A name that resolves nowhere is
kept as written, and ``mkdocs build --strict`` fails on it: a reference to an
object the API pages do not show is an error, not a dead word.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([\w.]+)`")


def _resolve(obj: griffe.Object, name: str) -> str:
    """The full path of ``name`` as seen from ``obj``'s docstring."""
    head = name.split(".", 1)[0]
    scope: Any = obj
    while scope is not None:
        if head == scope.name and not scope.parent:  # an absolute path from the package
            return name
        members = scope.all_members if scope.is_class else scope.members  # a class's inherited members too
        if head in members:
            member = members[head]
            base = member.target_path if member.is_alias else member.path
            return base + name[len(head):]
        scope = scope.parent
    return name


class SphinxRoles(griffe.Extension):
    """Rewrites the roles of every docstring once the object tree is complete."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.is_alias or obj.docstring is None:
            return

        def link(match: re.Match) -> str:
            short, name = match.group(1), match.group(2)
            text = name.rsplit(".", 1)[-1] if short else name
            return f"[`{text}`][{_resolve(obj, name)}]"

        obj.docstring.value = ROLE.sub(link, obj.docstring.value)
