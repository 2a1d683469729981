"""Rendering the submit files and scripts from dagman_templates/, their single source.

Strict: a name a template uses but the caller does not give is an error, not an empty string
in a submit file.
"""

from typing import Any

import jinja2

from dagman_templates import TEMPLATE_DIR

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    autoescape=False,
)


def render(template: str, **context: Any) -> str:
    return _ENV.get_template(template).render(**context)
