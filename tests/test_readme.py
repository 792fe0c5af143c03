"""The README's model table is the generated one."""

from __future__ import annotations

from pathlib import Path

from bit_zoo.tools.model_table import END, START, model_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_model_table_is_generated_from_the_records():
    text = README.read_text(encoding="utf-8")
    table = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert table == model_table(), "run: python -m bit_zoo.tools.model_table --write README.md"
