"""`python -m bit_zoo.embed`: embeddings of a dataset split (the tool lives in bit_zoo/tools/embed.py)."""

from .tools.embed import main

if __name__ == "__main__":
    raise SystemExit(main())
