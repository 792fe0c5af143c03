"""`python -m bit_zoo.predict`: classify images with a model (the tool lives in bit_zoo/tools/predict.py)."""

from .tools.predict import main

if __name__ == "__main__":
    raise SystemExit(main())
