"""Jinja2 templates of the DAG, the submit files and the node POST script."""

from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent
