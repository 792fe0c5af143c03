"""What train.py and validate.py share: logging, the checks on data and weights, the model.

Each check is written once here; the scripts call them in order before anything is written.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import bit_zoo

from . import __version__
from .config import Config, ModelConfig
from .data import dataset_num_classes
from .data.from_config import DataConfig
from .data.sources import IMAGE_EXTENSIONS
from .errors import ConfigError
from .models.factory import CUSTOM_ARCHITECTURE
from .utils.remote import Mirror, fetch, is_remote, stage

__all__ = [
    "localize",
    "Localized",
    "setup_logging",
    "check_data",
    "check_weights_source",
    "resolve_num_classes",
    "build_model",
    "model_meta",
]

_logger = logging.getLogger(__name__)

def _folder_selection(data: DataConfig, script: str):
    """select() for stage(): the files of a class-folder dataset that this run reads, and nothing else.

    The splits read (train.py: train and val; validate.py: its split, or train when val is held out of
    it) and, with `classes`, only those classes' images. Every other class folder of train is created
    empty with a NOT_STAGED marker: labels are the sorted train class folders, so all of them must exist.
    """

    def select(rels: list[str]) -> tuple[list[str], list[str]]:
        tops = {rel.split("/", 1)[0] for rel in rels if "/" in rel}
        split_dirs = [s for s in ("train", "val", "test") if s in tops] if "train" in tops else []
        if not split_dirs:  # class folders at the top: a single train split
            prefixes = {"train": ""}
        else:
            prefixes = {s: f"{s}/" for s in split_dirs}
        if script == "train":
            needed = {"train"} if data.val_split else {"train", "val"}
        else:
            needed = {"train"} if data.split == "val" and data.val_split else {data.split}
        train = prefixes["train"]
        in_train = [rel[len(train) :] for rel in rels if rel.startswith(train)]
        class_names = sorted({rel.split("/", 1)[0] for rel in in_train if rel.count("/") == 1 and not rel.startswith(".")})
        chosen = set(class_names) if data.classes is None else {class_names[c] for c in data.classes if 0 <= c < len(class_names)}
        wanted, empty = [], []
        for split, prefix in prefixes.items():
            if split not in needed and split != "train":
                continue
            for name in class_names:
                if split in needed and name in chosen:
                    folder = f"{prefix}{name}/"
                    wanted += [rel for rel in rels if rel.startswith(folder) and "/" not in rel[len(folder) :]
                               and rel.lower().endswith(IMAGE_EXTENSIONS)]  # fmt: skip
                else:
                    empty.append(f"{prefix}{name}")
        return wanted, empty

    return select


def _stage_data(data: DataConfig, script: str) -> str:
    if data.dataset.startswith("cifar"):
        # the files a CIFAR run reads: the binary batches and the label names
        return str(stage(data.data_dir, include=lambda rel: rel.endswith((".bin", ".txt"))))
    if data.dataset == "digits":  # digits comes with scikit-learn: nothing to stage
        return data.data_dir
    return str(stage(data.data_dir, select=_folder_selection(data, script)))


@dataclass
class Localized:
    """What localize() changed: the remote URLs the user gave, and the Mirror of a remote output_dir."""

    given: dict[tuple[str, str], str] = field(default_factory=dict)  # (group, option) -> URL
    mirror: Mirror | None = None

    def as_given(self, cfg: Config) -> Config:
        """A copy of cfg with the user's URLs in place of the local copies (for config.yaml, the summary)."""
        out = copy.deepcopy(cfg)
        for (group, key), url in self.given.items():
            setattr(getattr(out, group), key, url)
        return out

    def outputs(self, local: str | Path) -> str:
        """Where a run's outputs are, as the user named it."""
        return self.mirror.url if self.mirror is not None else str(local)


def localize(cfg: Config, *, script: str = "train") -> Localized:
    """Replace remote locations (s3://..., see bit_zoo.utils.remote) in cfg by local ones, in place.

    Inputs (data_dir, checkpoint_path, ckpt_path, resume, teacher_checkpoint_path) are staged into
    the cache (of a class-folder dataset only the files this run reads); a remote output_dir becomes
    a local folder whose files the returned Mirror uploads (``--resume auto`` first brings the remote
    last.ckpt and metrics.jsonl back, for a fresh node). A new run refuses a remote output_dir that
    holds a previous run, as it does a local one.
    """
    done = Localized()
    data = cfg.data
    if is_remote(data.data_dir):
        done.given[("data", "data_dir")] = data.data_dir
        data.data_dir = _stage_data(data, script)
    staged = (("model", "checkpoint_path"), ("model", "ckpt_path"), ("checkpoint", "resume"), ("distill", "teacher_checkpoint_path"))
    for group, key in staged:
        value = getattr(getattr(cfg, group), key, None)
        if value is not None and is_remote(value):
            done.given[(group, key)] = value
            setattr(getattr(cfg, group), key, fetch(value))
    url = getattr(cfg.system, "output_dir", None)
    if not is_remote(url):
        return done
    done.given[("system", "output_dir")] = url
    mirror = done.mirror = Mirror(url)
    mirror.check_writable()
    cfg.system.output_dir = str(mirror.local)
    resume = getattr(cfg.checkpoint, "resume", None)
    if resume == "auto":
        if mirror.restore("last.ckpt") is not None:
            mirror.restore("metrics.jsonl")  # the resumed run appends to it
    elif resume is None and not getattr(cfg.system, "overwrite", False) and mirror.exists("last.ckpt"):
        raise ConfigError(
            f"output_dir {url} holds a previous run (last.ckpt): pass --resume auto to continue it, "
            "--output_dir NEW for a new run, or --overwrite true to replace it"
        )
    _logger.info("output_dir %s: written to %s, uploaded after every checkpoint", url, mirror.local)
    return done


def setup_logging(is_main: bool = True) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True
    )


def check_data(data: DataConfig) -> None:
    if data.dataset != "digits" and not data.data_dir:
        raise ConfigError(f"dataset {data.dataset} needs --data_dir (the folder with the data); only digits needs none")


def check_weights_source(m: ModelConfig, path: str | None, *, flag: str, required: bool = False) -> None:
    """pretrained vs a local file (passed as --flag): not both, an existing file (the model itself: bit_zoo.create_model)."""
    if required and not path and not m.pretrained:
        raise ConfigError(f"nothing to evaluate: pass --{flag} FILE (training checkpoint, .npz or mindcv .ckpt) or --pretrained true")
    if m.pretrained and path:
        raise ConfigError(f"pretrained and {flag} both set: keep one ({flag} loads a local file)")
    if path and not Path(path).is_file():
        raise ConfigError(
            f"{flag} {path}: no such file. Point it at a weights file (.npz, mindcv .ckpt, bit_zoo .ckpt or .safetensors), "
            "or run the training that writes it first (the config's header names it)"
        )
    if m.model != CUSTOM_ARCHITECTURE and (list(m.layers) != [1, 1, 1, 1] or m.width_factor != 1):
        _logger.warning("layers/width_factor apply to --model resnetv2 only: %s has its own geometry", m.model)


def resolve_num_classes(cfg: Config) -> int:
    """The data's class count, which an explicit num_classes must equal."""
    d = cfg.data
    num_classes = dataset_num_classes(d.dataset, d.data_dir, d.classes)
    if cfg.model.num_classes is not None and cfg.model.num_classes != num_classes:
        subset = f" (classes: {d.classes})" if d.classes is not None else ""
        raise ConfigError(
            f"num_classes={cfg.model.num_classes} in the config but {d.dataset} at {d.data_dir} has {num_classes} classes{subset}: "
            f"set num_classes: {num_classes} (or null to take it from the data)"
        )
    return num_classes


def build_model(m: ModelConfig, num_classes: int, *, weights: str | None, ema: bool | None = False, recompute: bool = False,
                same_classes: bool = False):  # fmt: skip
    """bit_zoo.create_model from the model options: `weights` (a file) or m.pretrained, else untrained.

    With same_classes (validate.py) the classifier is the file's (or the record's) and must have
    num_classes outputs; otherwise another class count gets BiT's zero head (fine-tuning).
    """
    geometry = {"layers": tuple(m.layers), "width_factor": m.width_factor} if m.model == CUSTOM_ARCHITECTURE else {}
    model = bit_zoo.create_model(
        m.model, pretrained=m.pretrained, checkpoint_path=weights or None, num_classes=None if same_classes else num_classes,
        ema=ema, allow_unverified=m.allow_unverified, conv_impl=m.conv_impl, recompute=recompute, **geometry,
    )  # fmt: skip
    if same_classes and model.num_classes != num_classes:
        _refuse_head(model.origin.source, model.num_classes, num_classes)
    return model


def _refuse_head(source: str, file_classes: int, data_classes: int) -> None:
    raise ConfigError(
        f"{source} has a {file_classes}-class classifier but the evaluated data has {data_classes} classes: "
        f"evaluate it on data with its {file_classes} classes, or fine-tune it first (train.py --checkpoint_path)"
    )


def model_meta(m: ModelConfig, model, *, class_names: list[str] | None, prep: dict) -> dict:
    """The meta.json entry of the checkpoints a run writes (bit_zoo.weights.meta); prep: train_preprocessing's."""
    return {
        "model": m.model,
        "layers": list(model.layers),
        "width_factor": int(model.width_factor),
        "num_classes": int(model.num_classes),
        "in_channels": int(model.in_channels),
        "class_names": list(class_names) if class_names is not None else None,
        "preprocess": {**prep["eval"].to_meta(), "image_size": prep["image_size"]},
        "bit_zoo_version": __version__,
    }
