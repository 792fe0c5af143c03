"""`python -m bit_zoo.convert`: convert weights between formats, or export a model (the tool lives in bit_zoo/tools/convert.py)."""

from .tools.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
