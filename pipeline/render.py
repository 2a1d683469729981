"""Rendering the DAG, submit files and scripts from dagman_templates/ (their single source)."""

from typing import Any

import jinja2

from dagman_templates import TEMPLATE_DIR


def dag_var(value: object) -> str:
    """A VARS value for DAGMan: inside double quotes, backslash and quote are escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"')


_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    autoescape=False,
)
_ENV.filters["dagvar"] = dag_var


def render(template: str, **context: Any) -> str:
    return _ENV.get_template(template).render(**context)
