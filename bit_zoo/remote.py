"""`python -m bit_zoo.remote`: put a dataset or weights into object storage (the tool lives in bit_zoo/tools/remote.py)."""

from .tools.remote import main

if __name__ == "__main__":
    raise SystemExit(main())
