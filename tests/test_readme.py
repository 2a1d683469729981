"""The README's config reference is the code's: a key added or changed must be documented."""

from pathlib import Path

from pipeline.config import reference_table


def test_readme_lists_every_config_key() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert reference_table() in readme
