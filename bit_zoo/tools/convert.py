"""Convert weights between formats and export models; what the input holds is kept.

    python -m bit_zoo.convert --input outputs/r50_tiny/best.ckpt --output r50.onnx     # a bit_zoo checkpoint knows its model
    python -m bit_zoo.convert --model bit_m_r50x1 --input BiT-M-R50x1.npz --output bit_m_r50x1.ckpt
    python -m bit_zoo.convert --model bit_s_r50x1 --input BiT_resnet50-1e4795a4.ckpt --output r50.safetensors
    python -m bit_zoo.convert --model bit_m_r50x1 --output bit_m_r50x1.npz              # the pretrained weights -> upstream layout
    python -m bit_zoo.convert --model resnetv2 --layers 1,1,1,1 --width_factor 1 --input tiny.ckpt --output tiny.mindir

Inputs (detected from the file): upstream .npz, timm's state_dict (.safetensors from the Hugging
Face hub), mindcv .ckpt, bit_zoo .ckpt/.safetensors (training checkpoints too; --ema takes their
EMA weights). Without --input the model's pretrained weights are used (fetched into the cache).

Outputs, by suffix: .ckpt, .safetensors (bit_zoo names, with the meta.json entry), .npz (the
upstream layout), .onnx and .mindir (an export-only form of the network, see export.py, with
dynamic batch, height and width axes). Every output is written under a
temporary name and renamed when complete.

The architecture comes from --model (a registered name, or resnetv2 with --layers and
--width_factor), else from the input's meta.json. The classifier is the input's: --num_classes
is only needed to change the class count, and then the head is zeroed (BiT's zero head) and the
tool says so.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mindspore.nn.utils import no_init_parameters

from ..data.from_config import DataConfig
from ..data.preprocess import resolve_data_config
from ..errors import ConfigError
from ..models.export import export_model
from ..models.options import ModelConfig
from ..models.factory import CUSTOM_ARCHITECTURE, Architecture, resolve_architecture
from ..models.registry import get_weights
from ..models.resnetv2 import ResNetV2
from ..options import option, parse_options
from ..utils import remote
from ..utils.atomic import atomic_path
from ..utils.runner import run_cli
from ..weights.formats import to_npz
from ..weights.loading import fetch_pretrained, lazy_weights, match_state, open_arrays, save_weights
from ..weights.meta import META_KEY, verify_digest, with_meta

__all__ = ["read_model_weights", "convert", "main"]

_logger = logging.getLogger(__name__)

OUTPUT_FORMATS = (".ckpt", ".safetensors", ".npz", ".onnx", ".mindir")
EXPORT_FORMATS = (".onnx", ".mindir")
PROG = "python -m bit_zoo.convert"
CONVERT = ("convert",)


def read_model_weights(
    input_path: str | os.PathLike,
    *,
    model: str | None = None,
    layers: tuple[int, ...] | None = None,
    width_factor: int | None = None,
    ema: bool = False,
    allow_unverified: bool = False,
) -> tuple[Architecture, dict[str, np.ndarray], dict | None]:
    """(architecture, bit_zoo parameters, meta or None) of a weights file of any supported format.

    A file bit_zoo wrote is checked against its digest (one without a digest only with allow_unverified).
    """
    fmt, reader = open_arrays(input_path)
    with reader:
        meta = verify_digest(input_path, reader, allow_unverified=allow_unverified) if META_KEY in reader else None
        arch = resolve_architecture(model, layers=layers, width_factor=width_factor, meta=meta, source=str(input_path))
        state = {k: np.asarray(v) for k, v in lazy_weights(reader, fmt, arch.layers, path=input_path, ema=ema).items()}
    return arch, state, meta


def _with_classes(state: dict[str, np.ndarray], num_classes: int | None, source: str) -> tuple[dict[str, np.ndarray], int]:
    """Keep the input's classifier; only an explicit other count replaces it with a zero head."""
    file_classes = state["head.fc.bias"].shape[0] if "head.fc.bias" in state else 0
    if num_classes is None or num_classes == file_classes:
        return state, file_classes
    state = {k: v for k, v in state.items() if not k.startswith("head.fc.")}
    if num_classes > 0:
        width = state["norm.gamma"].shape[0]
        state["head.fc.weight"] = np.zeros((num_classes, width), np.float32)
        state["head.fc.bias"] = np.zeros((num_classes,), np.float32)
    _logger.warning(
        "%s has %d classes; --num_classes %d: the classifier is replaced by a zero head (every logit 0 until fine-tuned)",
        source,
        file_classes,
        num_classes,
    )
    return state, num_classes


def _meta_out(meta: dict | None, arch: Architecture, num_classes: int, in_channels: int) -> dict:
    out = dict(meta or {})
    if out.get("num_classes") not in (None, num_classes):
        out["class_names"] = None  # the names belonged to the replaced head
    out.update(model=arch.name, layers=list(arch.layers), width_factor=arch.width_factor, num_classes=num_classes, in_channels=in_channels)
    if "preprocess" not in out and arch.weights is not None:
        out["preprocess"] = resolve_data_config(weights=arch.weights).to_meta()
    out.setdefault("class_names", None)
    return out


def convert(
    output: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
    model: str | None = None,
    layers: tuple[int, ...] | None = None,
    width_factor: int | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    batch_size: int = 1,
    ema: bool = False,
    allow_unverified: bool = False,
) -> Path:
    """Write the weights of `input_path` (or of the model's pretrained record) to `output`, format by suffix.

    A .ckpt or .safetensors output carries meta.json with a digest of what it holds (the input's
    digest described the input: a training checkpoint's optimizer state, say); .npz, .onnx and
    .mindir carry none. The output may not be the input: the input stays as it was.
    """
    output = Path(output)
    if output.suffix not in OUTPUT_FORMATS:
        raise ValueError(f"output {output} must end in one of {', '.join(OUTPUT_FORMATS)}")
    if input_path is not None and output.exists() and os.path.samefile(output, input_path):
        raise ValueError(
            f"--output {output} is the --input file: converting in place would replace it (and drop what the output format "
            "does not keep, e.g. a training checkpoint's optimizer state). Write to a new name"
        )
    if input_path is None:
        if model is None or model == CUSTOM_ARCHITECTURE:
            raise ValueError("without --input, --model must be a registered name (its pretrained weights are used)")
        input_path = fetch_pretrained(get_weights(model))
    arch, state, meta = read_model_weights(
        input_path, model=model, layers=layers, width_factor=width_factor, ema=ema, allow_unverified=allow_unverified
    )
    state, classes = _with_classes(state, num_classes, str(input_path))
    in_channels = state["stem.conv.weight"].shape[1]
    with no_init_parameters():  # names and shapes only
        skeleton = ResNetV2(arch.layers, arch.width_factor, num_classes=classes, in_channels=in_channels)
    state = match_state(skeleton, state, source=str(input_path))
    meta = _meta_out(meta, arch, classes, in_channels)
    if output.suffix in (".onnx", ".mindir"):
        size = img_size or (meta.get("preprocess") or {}).get("eval_size") or 224
        export_model(state, arch.layers, output, img_size=size, in_channels=in_channels, batch_size=batch_size)
    elif output.suffix == ".npz":
        if classes == 0:
            raise ValueError("the upstream .npz layout needs a classifier; the input has none (pass --num_classes for a zero head)")
        with atomic_path(output, suffix=".npz") as tmp:  # np.savez appends .npz to other names
            np.savez(tmp, **to_npz(state, arch.layers))
    else:
        save_weights(with_meta(state, meta), output)  # a fresh digest: of these weights and this meta.json
    _logger.info("%s (%s, %d classes) -> %s", input_path, arch.name, classes, output)
    return output


@dataclass
class ConvertConfig:
    input: str | None = option(
        None, "weights file (.npz, timm .safetensors, mindcv .ckpt, bit_zoo .ckpt/.safetensors); default: the pretrained weights",
        scripts=CONVERT,
    )  # fmt: skip
    output: str | None = option(None, f"output file, one of {', '.join(OUTPUT_FORMATS)}", scripts=CONVERT, required=True)


GROUPS = [("model", ModelConfig), ("data", DataConfig), ("convert", ConvertConfig)]


def parse(argv: list[str] | None):
    return parse_options("convert", GROUPS, argv, prog=PROG, description=__doc__)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, prog=PROG)


def _main(argv: list[str] | None) -> int:
    parsed = parse(argv)
    m, d, c = parsed["model"], parsed["data"], parsed["convert"]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if Path(c.output).suffix not in EXPORT_FORMATS and (d.image_size is not None or d.batch_size != 1):
        raise ConfigError(
            f"--image_size and --batch_size shape the example input of an export ({', '.join(EXPORT_FORMATS)}); "
            f"--output {c.output} is a weights file and has none: drop them"
        )
    # a URL (s3://...) input is staged into the cache; a URL output is written locally, then uploaded
    local_output = remote.local_cache(c.output) if remote.is_remote(c.output) else c.output
    out = convert(
        local_output,
        input_path=remote.fetch(c.input),
        model=m.model,
        layers=tuple(m.layers) if m.layers else None,
        width_factor=m.width_factor,
        num_classes=m.num_classes,
        img_size=d.image_size,
        batch_size=d.batch_size,
        ema=bool(m.ema),
        allow_unverified=m.allow_unverified,
    )
    if remote.is_remote(c.output):
        out = remote.put(out, c.output)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
