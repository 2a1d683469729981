"""Jinja2 templates of the submit files and scripts a run directory holds (the DAG file is
written from its model, pipeline.dag)."""

from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent
