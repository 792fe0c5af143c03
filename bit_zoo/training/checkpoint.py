"""Training checkpoints: everything --resume needs, in one MindSpore .ckpt, written atomically.

Layout (the bit_zoo training-checkpoint convention, readable by bit_zoo.weights.loading.load_checkpoint):
    <param name>          model weights
    ema.<param name>      EMA weights (when EMA is on)
    optim.<name>          optimizer state (moments, global_step; the lr array is rebuilt from the config)
    state.<name>          step, epoch, data position, loss scale and its counter, best top-1

    meta.json             architecture, class names, preprocessing and a digest of the rest (bit_zoo.weights.meta),
                          written first so a truncated file is detected on load

Files in the output dir: ``last.ckpt`` (every save), ``best.ckpt`` (best eval top-1),
``step_<N>.ckpt`` (periodic, at most keep_max kept).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import mindspore as ms
import numpy as np

from ..utils.atomic import atomic_path, save_checkpoint_atomic
from ..weights.loading import EMA_PREFIX, save_weights
from ..weights.meta import decode_meta, verify_digest, with_meta
from ..options import at_least, option

__all__ = [
    "CheckpointConfig",
    "TrainState",
    "save_training_checkpoint",
    "load_training_checkpoint",
    "CheckpointManager",
    "export_weights",
]

_logger = logging.getLogger(__name__)

OPTIM_PREFIX = "optim."
STATE_PREFIX = "state."
_SKIP_OPTIM = ("learning_rate",)  # rebuilt from the config on resume


@dataclass
class CheckpointConfig:
    """The "checkpoint" option group (see bit_zoo.options): what is saved, evaluated and logged when."""

    resume: str | None = option(None, "a training checkpoint, or 'auto' for <output_dir>/last.ckpt")
    save_interval: int = option(0, "also save every N optimizer steps (step_N.ckpt); 0 = epoch ends only", check=at_least(0))
    keep_max: int = option(3, "periodic checkpoints kept", check=at_least(0))
    eval_interval: int = option(1, "evaluate every N epochs (and at the end); 0 = at the end only", check=at_least(0))
    log_interval: int = option(20, "progress lines every N steps when not a terminal", check=at_least(1))
    async_save: bool = option(
        True,
        "write checkpoints in a background thread: training waits only for the copy to host memory (and, with several "
        "devices, the other ranks wait only that long for rank 0); a failed write stops the run at the next save",
    )


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
    # the running sums of the epoch in progress, so a resumed epoch reports the same train loss
    epoch_loss_sum: float = 0.0
    epoch_loss_steps: int = 0
    epoch_overflows: int = 0


def _optimizer_state(optimizer, model_names: set[str]) -> dict[str, ms.Parameter]:
    out = {}
    for p in optimizer.get_parameters():
        if p.name in model_names or p.name in _SKIP_OPTIM or p.name.startswith(EMA_PREFIX) or p.name.startswith("accum."):
            continue
        out[p.name] = p
    return out


def _atomic_save(arrays: dict[str, np.ndarray], path: Path) -> None:
    entries = [{"name": k, "data": ms.Tensor(v)} for k, v in arrays.items()]  # dict order: meta.json first
    save_checkpoint_atomic(entries, path)  # space checked first; a full disk is one DiskFullError, no temp left


def save_training_checkpoint(path: str | Path, *, model, optimizer, ema, scaler, state: TrainState, meta: dict | None = None) -> Path:
    """Write everything --resume needs, with `meta` (bit_zoo.weights.meta keys) and the content digest first."""
    path = Path(path)
    _atomic_save(training_arrays(model=model, optimizer=optimizer, ema=ema, scaler=scaler, state=state, meta=meta), path)
    return path


def training_arrays(*, model, optimizer, ema, scaler, state: TrainState, meta: dict | None = None) -> dict[str, np.ndarray]:
    """A host copy of everything --resume needs (meta.json and its digest first): what a checkpoint write reads."""
    model_params = list(model.get_parameters())
    names = {p.name for p in model_params}
    arrays = {p.name: p.asnumpy().copy() for p in model_params}  # asnumpy() shares the parameter's memory (MindSpore 2.10): async saving needs a copy
    if ema is not None:
        arrays.update({s.name: s.asnumpy().copy() for s in ema.shadow})
    arrays.update({OPTIM_PREFIX + n: p.asnumpy().copy() for n, p in _optimizer_state(optimizer, names).items()})
    state.loss_scale = float(scaler.scale_value.asnumpy())
    counter = getattr(scaler, "counter", None)
    state.loss_scale_counter = int(counter.asnumpy()) if counter is not None else 0
    for f in fields(state):
        value = getattr(state, f.name)
        arrays[STATE_PREFIX + f.name] = np.asarray(value, dtype=np.float64 if isinstance(value, float) else np.int64)
    return with_meta(arrays, meta or {})


def export_weights(model, path: str | Path, *, meta: dict) -> Path:
    """The model's weights alone (float32, .ckpt or .safetensors by suffix), with meta.json and its digest."""
    arrays = {p.name: p.asnumpy().astype(np.float32) for p in model.get_parameters()}
    return save_weights(with_meta(arrays, meta), path)


def load_training_checkpoint(
    path: str | Path,
    *,
    model,
    optimizer,
    ema,
    scaler,
    check_meta: Callable[[dict], None] | None = None,
    allow_unverified: bool = False,
) -> TrainState:
    """Restore model, optimizer, EMA and loss scale in place; return the TrainState.

    Raises ValueError naming the file when it is not a bit_zoo training checkpoint, is corrupt,
    or does not fit the model/optimizer (e.g. a different optimizer or EMA setting).
    ``check_meta(meta)`` sees the file's meta.json first and raises to refuse it (train.py: the
    training data must be the one the run started with).
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
    arrays = {k: v.asnumpy() for k, v in data.items()}
    verify_digest(path, arrays, allow_unverified=allow_unverified)
    if check_meta is not None:
        check_meta(decode_meta(arrays) or {})
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
    """last.ckpt + best.ckpt + periodic step_<N>.ckpt (at most keep_max); rank 0 only.

    With ``async_save`` the files are written by one background thread from a host copy taken at
    save(): the step goes on while the disk works. One write is in flight at a time (the next save
    waits for it, so at most one extra copy of the state is in memory), and its error (a full disk)
    is raised by the next save() or by wait(), which the loop calls before it returns or stops.
    """

    def __init__(
        self, directory: str | Path, *, keep_max: int = 3, enabled: bool = True, meta: dict | None = None, async_save: bool = False
    ) -> None:
        self.directory = Path(directory)
        self.keep_max = keep_max
        self.enabled = enabled
        self.meta = meta
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint") if async_save and enabled else None
        self._pending: Future | None = None

    def periodic(self) -> list[Path]:
        return sorted(self.directory.glob("step_*.ckpt"), key=lambda p: int(p.stem.split("_")[1]))

    def save(self, *, periodic: bool, best: bool, then: Callable[[], object] | None = None, **kwargs) -> None:
        """Save last.ckpt (and step_<N>.ckpt, best.ckpt), then call `then` (e.g. an upload) once they are on disk."""
        if not self.enabled:
            return
        self.wait()
        state: TrainState = kwargs["state"]
        arrays = training_arrays(meta=self.meta, **kwargs)
        job = (arrays, state.step, asdict(state), periodic, best, then)
        if self._writer is None:
            self._write(*job)
        else:
            self._pending = self._writer.submit(self._write, *job)

    def wait(self) -> None:
        """Block until the write in flight is on disk; raise its error, if it had one."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write(self, arrays: dict, step: int, state: dict, periodic: bool, best: bool, then: Callable[[], object] | None) -> None:
        last = self.directory / "last.ckpt"
        _atomic_save(arrays, last)
        if periodic:
            _copy_atomic(last, self.directory / f"step_{step}.ckpt")
            for old in self.periodic()[: -self.keep_max] if self.keep_max > 0 else []:
                old.unlink(missing_ok=True)
        if best:
            _copy_atomic(last, self.directory / "best.ckpt")
        _logger.debug("saved checkpoint at step %d (%s)", step, state)
        if then is not None:
            then()


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst, expected_bytes=src.stat().st_size) as tmp:
        shutil.copyfile(src, tmp)
