"""`bit-zoo TOOL ...` (or `python -m bit_zoo TOOL ...`): one entry point for the command-line tools.

Each tool is also `python -m bit_zoo.TOOL`; both run the same main() from bit_zoo/tools/.
"""

from __future__ import annotations

import importlib
import sys

TOOLS = {
    "predict": "classify image files and folders: top-k labels, optionally a CSV",
    "embed": "pre-logits embeddings of a dataset split, to an .npz",
    "fewshot": "few-shot linear evaluation of frozen embeddings",
    "convert": "convert weights between formats, or export to ONNX / MINDIR",
    "memory": "peak memory of a training config per device, before any device is used",
    "remote": "put a dataset or weights into object storage",
    "model_table": "the README's model table, generated from the weights records",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: bit-zoo TOOL [options]   (bit-zoo TOOL --help for a tool's options)\n\ntools:")
        for name, what in TOOLS.items():
            print(f"  {name:<12} {what}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in TOOLS:
        import difflib

        close = difflib.get_close_matches(name, TOOLS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; one of: {', '.join(TOOLS)}"
        print(f"bit-zoo: error: unknown tool {name!r}{hint}", file=sys.stderr)
        return 2
    return importlib.import_module(f"bit_zoo.tools.{name}").main(rest) or 0


if __name__ == "__main__":
    raise SystemExit(main())
