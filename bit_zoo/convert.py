"""Convert weights between formats and export models.

    python -m bit_zoo.convert --model bit_m_r50x1 --input BiT-M-R50x1.npz --output bit_m_r50x1.ckpt
    python -m bit_zoo.convert --model bit_s_r50x1 --input BiT_resnet50-1e4795a4.ckpt --output r50.safetensors
    python -m bit_zoo.convert --model bit_m_r50x1 --output bit_m_r50x1.npz             # our weights -> upstream layout
    python -m bit_zoo.convert --model bit_m_r50x1.in21k_ft_cifar10 --output r50_c10.mindir --num-classes 10

Without --input the model's pretrained weights are used (downloaded into the cache). The input
format is detected from the file (upstream .npz, mindcv .ckpt, bit_zoo .ckpt/.safetensors); the
output format follows the output suffix. Every output is written under a temporary name and
renamed when complete, so a failed conversion never leaves a half-written file.

ONNX is not offered: MindSpore 2.10's ONNX exporter has no GroupNorm and no PadV3.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore.nn.utils import no_init_parameters

from .atomic import atomic_path
from .factory import create_model
from .formats import to_npz
from .loading import fetch_pretrained, match_state, read_weights_file, save_weights
from .registry import get_weights
from .resnetv2 import ResNetV2

__all__ = ["convert_file", "export_mindir", "main"]

_logger = logging.getLogger(__name__)

OUTPUT_FORMATS = (".ckpt", ".safetensors", ".npz", ".mindir")


def _skeleton(model_name: str, num_classes: int | None) -> ResNetV2:
    """The model's structure without allocating its weights (only names and shapes are needed)."""
    with no_init_parameters():
        return create_model(model_name, num_classes=num_classes)


def _source(model_name: str, input_path: str | None) -> Path:
    if input_path:
        return Path(input_path)
    return fetch_pretrained(get_weights(model_name))


def _write_npz(arrays: dict[str, np.ndarray], path: Path) -> None:
    with atomic_path(path, suffix=".npz") as tmp:  # np.savez appends .npz to other names
        np.savez(tmp, **arrays)


def convert_file(model_name: str, output: str | os.PathLike, *, input_path: str | None = None, num_classes: int | None = None) -> Path:
    """Convert the weights of `model_name` (a file, or its pretrained weights) to .ckpt/.safetensors/.npz."""
    output = Path(output)
    if output.suffix not in (".ckpt", ".safetensors", ".npz"):
        raise ValueError(f"output {output} must end in .ckpt, .safetensors or .npz (or .mindir for export)")
    src = _source(model_name, input_path)
    skeleton = _skeleton(model_name, num_classes)
    state = match_state(skeleton, read_weights_file(src, skeleton.layers), source=str(src))
    if output.suffix == ".npz":
        if not any(k.startswith("head.fc.") for k in state):
            raise ValueError("the .npz layout needs a classifier: pass --num-classes equal to the weights' classes")
        _write_npz(to_npz(state, skeleton.layers), output)
    else:
        save_weights(state, output)
    _logger.info("wrote %d arrays from %s to %s", len(state), src, output)
    return output


def export_mindir(
    model_name: str,
    output: str | os.PathLike,
    *,
    input_path: str | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    batch_size: int = 1,
) -> Path:
    """Export the model with its weights to MINDIR (graph of the native conv path, for any device)."""
    output = Path(output)
    if output.suffix != ".mindir":
        raise ValueError(f"MINDIR output {output} must end in .mindir")
    src = _source(model_name, input_path)
    model = create_model(model_name, num_classes=num_classes, checkpoint_path=str(src), conv_impl="native")
    model.set_train(False)
    size = img_size or model.weights.input_size
    x = ms.Tensor(np.zeros((batch_size, model.in_channels, size, size), np.float32))
    with atomic_path(output, suffix=".mindir") as tmp:
        ms.export(model, x, file_name=str(tmp.with_suffix("")), file_format="MINDIR")  # export appends .mindir
    _logger.info("exported %s (%dx%d, batch %d) to %s", model_name, size, size, batch_size, output)
    return output


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bit_zoo.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="registered name, optionally name.tag (see bit_zoo.list_models(pretrained=True))")
    p.add_argument("--input", help="weights file (.npz, mindcv .ckpt, bit_zoo .ckpt/.safetensors); default: the pretrained weights")
    p.add_argument("--output", required=True, help=f"output file, one of {', '.join(OUTPUT_FORMATS)}")
    p.add_argument("--num-classes", type=int, help="classifier size (default: the weights'); a different size gets a zero head")
    p.add_argument("--img-size", type=int, help="MINDIR input resolution (default: the weights' input size)")
    p.add_argument("--batch-size", type=int, default=1, help="MINDIR input batch size")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.output.endswith(".mindir"):
            out = export_mindir(
                args.model,
                args.output,
                input_path=args.input,
                num_classes=args.num_classes,
                img_size=args.img_size,
                batch_size=args.batch_size,
            )
        else:
            out = convert_file(args.model, args.output, input_path=args.input, num_classes=args.num_classes)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
