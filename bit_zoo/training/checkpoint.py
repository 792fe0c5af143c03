"""Training checkpoints: everything --resume needs, in one MindSpore .ckpt, written atomically.

Layout (the bit_zoo training-checkpoint convention, readable by bit_zoo.loading.load_checkpoint):
    <param name>          model weights
    ema.<param name>      EMA weights (when EMA is on)
    optim.<name>          optimizer state (moments, global_step; the lr array is rebuilt from the config)
    state.<name>          step, epoch, data position, loss scale and its counter, best top-1

Files in the output dir: ``last.ckpt`` (every save), ``best.ckpt`` (best eval top-1),
``step_<N>.ckpt`` (periodic, at most keep_max kept).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import mindspore as ms
import numpy as np

from ..atomic import atomic_path

__all__ = ["TrainState", "save_training_checkpoint", "load_training_checkpoint", "CheckpointManager"]

_logger = logging.getLogger(__name__)

OPTIM_PREFIX = "optim."
STATE_PREFIX = "state."
EMA_PREFIX = "ema."
_SKIP_OPTIM = ("learning_rate",)  # rebuilt from the config on resume


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    micro_step: int = 0  # micro-batches consumed from the data stream (the loader's start_step)
    epoch: int = 0  # epochs completed
    best_top1: float = -1.0
    loss_scale: float = 1.0
    loss_scale_counter: int = 0
    total_steps: int = 0
    global_batch: int = 0


def _optimizer_state(optimizer, model_names: set[str]) -> dict[str, ms.Parameter]:
    out = {}
    for p in optimizer.get_parameters():
        if p.name in model_names or p.name in _SKIP_OPTIM or p.name.startswith(EMA_PREFIX) or p.name.startswith("accum."):
            continue
        out[p.name] = p
    return out


def _atomic_save(entries: list[dict], path: Path) -> None:
    with atomic_path(path, suffix=".ckpt") as tmp:  # save_checkpoint appends .ckpt to other names
        ms.save_checkpoint(entries, str(tmp))


def save_training_checkpoint(path: str | Path, *, model, optimizer, ema, scaler, state: TrainState) -> Path:
    path = Path(path)
    model_params = list(model.get_parameters())
    names = {p.name for p in model_params}
    entries = [{"name": p.name, "data": ms.Tensor(p.asnumpy())} for p in model_params]
    if ema is not None:
        entries += [{"name": s.name, "data": ms.Tensor(s.asnumpy())} for s in ema.shadow]
    entries += [{"name": OPTIM_PREFIX + n, "data": ms.Tensor(p.asnumpy())} for n, p in _optimizer_state(optimizer, names).items()]
    state.loss_scale = float(scaler.scale_value.asnumpy())
    counter = getattr(scaler, "counter", None)
    state.loss_scale_counter = int(counter.asnumpy()) if counter is not None else 0
    for f in fields(state):
        value = getattr(state, f.name)
        dtype = np.float64 if isinstance(value, float) else np.int64
        entries.append({"name": STATE_PREFIX + f.name, "data": ms.Tensor(np.asarray(value, dtype=dtype))})
    _atomic_save(entries, path)
    return path


def load_training_checkpoint(path: str | Path, *, model, optimizer, ema, scaler) -> TrainState:
    """Restore model, optimizer, EMA and loss scale in place; return the TrainState.

    Raises ValueError naming the file when it is not a bit_zoo training checkpoint, is corrupt,
    or does not fit the model/optimizer (e.g. a different optimizer or EMA setting).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {path}: no such file. Pass a training checkpoint (e.g. <output_dir>/last.ckpt) or 'auto'.")
    try:
        data = ms.load_checkpoint(str(path))
    except Exception as e:  # noqa: BLE001 - any reader failure means the same to the user
        raise ValueError(
            f"cannot read {path}: {e}. The file is corrupt or truncated; resume from another checkpoint (e.g. step_*.ckpt)."
        ) from e
    if STATE_PREFIX + "step" not in data:
        raise ValueError(
            f"{path} is not a bit_zoo training checkpoint (no state.* entries): use it as checkpoint_path to start a new run instead of --resume."
        )
    problems = []

    def put(param, key):
        if key not in data:
            problems.append(f"missing {key}")
            return
        value = data[key].asnumpy()
        if tuple(value.shape) != tuple(param.shape):
            problems.append(f"{key}: file {value.shape} vs run {tuple(param.shape)}")
            return
        param.set_data(ms.Tensor(value.astype(param.asnumpy().dtype)))

    model_params = list(model.get_parameters())
    names = {p.name for p in model_params}
    for p in model_params:
        put(p, p.name)
    if ema is not None:
        for s in ema.shadow:
            put(s, s.name)
    for n, p in _optimizer_state(optimizer, names).items():
        put(p, OPTIM_PREFIX + n)
    if problems:
        raise ValueError(
            f"{path} does not fit this run ({'; '.join(problems[:6])}{' ...' if len(problems) > 6 else ''}): "
            "resume with the same model, optimizer, EMA and num_classes settings it was written with."
        )
    state = TrainState(
        **{
            f.name: type(getattr(TrainState(), f.name))(data[STATE_PREFIX + f.name].asnumpy())
            for f in fields(TrainState)
            if STATE_PREFIX + f.name in data
        }
    )
    scaler.scale_value.set_data(ms.Tensor(np.float32(state.loss_scale)))
    if getattr(scaler, "counter", None) is not None:
        scaler.counter.set_data(ms.Tensor(np.int32(state.loss_scale_counter)))
    return state


class CheckpointManager:
    """last.ckpt + best.ckpt + periodic step_<N>.ckpt (at most keep_max); rank 0 only."""

    def __init__(self, directory: str | Path, *, keep_max: int = 3, enabled: bool = True) -> None:
        self.directory = Path(directory)
        self.keep_max = keep_max
        self.enabled = enabled

    def periodic(self) -> list[Path]:
        return sorted(self.directory.glob("step_*.ckpt"), key=lambda p: int(p.stem.split("_")[1]))

    def save(self, *, periodic: bool, best: bool, **kwargs) -> None:
        if not self.enabled:
            return
        state: TrainState = kwargs["state"]
        last = save_training_checkpoint(self.directory / "last.ckpt", **kwargs)
        if periodic:
            target = self.directory / f"step_{state.step}.ckpt"
            _copy_atomic(last, target)
            for old in self.periodic()[: -self.keep_max] if self.keep_max > 0 else []:
                old.unlink(missing_ok=True)
        if best:
            _copy_atomic(last, self.directory / "best.ckpt")
        _logger.debug("saved checkpoint at step %d (%s)", state.step, asdict(state))


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        tmp.write_bytes(src.read_bytes())
