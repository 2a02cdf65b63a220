"""The HTML pages' Jinja2 templates (``vlsi/tools/templates/*.html.j2``, package data), autoescaped.

``page.html.j2`` is the self-contained page every other template extends (inline style, no
external asset); ``macros.html.j2`` holds the table and the layer-wise panel.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import jinja2


@cache
def environment() -> jinja2.Environment:
    """The templates' environment: autoescape on, an undefined name is an error."""
    return jinja2.Environment(loader=jinja2.PackageLoader("vlsi.tools", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def render(template: str, **context: Any) -> str:
    """The page ``template`` (a file name in ``vlsi/tools/templates``) filled with ``context``."""
    return environment().get_template(template).render(**context)
