"""`python -m bit_zoo.memory`: peak memory of a training config per device (the tool lives in bit_zoo/tools/memory.py)."""

from .tools.memory import main

if __name__ == "__main__":
    raise SystemExit(main())
