"""The HTML pages' Jinja2 templates (``templates/*.html.j2`` of a package, package data), autoescaped.

``vlsi/tools/templates`` holds ``page.html.j2``, the self-contained page every other template
extends (inline style, no external asset), ``macros.html.j2`` (the table and the layer-wise
panel) and the tools' own pages; a package above (``vlsi.demo``) keeps its pages in its own
``templates`` directory and renders them with ``render(..., package="vlsi.demo")``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import jinja2


@cache
def environment(package: str = "vlsi.tools") -> jinja2.Environment:
    """The templates of ``package``, then the shared ones: autoescape on, an undefined name is an error."""
    loaders = [jinja2.PackageLoader(name, "templates") for name in dict.fromkeys((package, "vlsi.tools"))]
    return jinja2.Environment(loader=jinja2.ChoiceLoader(loaders), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def render(template: str, *, package: str = "vlsi.tools", **context: Any) -> str:
    """The page ``template`` (a file name in ``package``'s ``templates``) filled with ``context``."""
    return environment(package).get_template(template).render(**context)
