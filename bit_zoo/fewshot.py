"""`python -m bit_zoo.fewshot`: few-shot linear evaluation (the tool lives in bit_zoo/tools/fewshot.py)."""

from .tools.fewshot import main

if __name__ == "__main__":
    raise SystemExit(main())
