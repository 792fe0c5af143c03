"""Backbone outputs, with timm's conventions: which maps a ResNet-v2 exposes and how they are picked.

Feature index 0 is the stem convolution (reduction 2, before the stem's max pool), indices 1-4 the
outputs of the four stages (reductions 4, 8, 16, 32; less with a dilated ``output_stride``). Names
and meanings follow timm's ``feature_info.get_dicts()`` and ``forward_intermediates`` so detection
and segmentation code written for timm or mindcv backbones reads bit_zoo's the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["FeatureInfo", "OUTPUT_STRIDES", "NUM_FEATURES", "feature_take_indices", "stage_strides_and_dilations"]

OUTPUT_STRIDES = (8, 16, 32)
NUM_FEATURES = 5  # stem conv + 4 stages


def feature_take_indices(num_features: int, indices: int | Sequence[int] | None = None) -> tuple[list[int], int]:
    """timm's rule: None -> all, an int n -> the last n, a sequence -> those (negative counts from the end).

    Returns (sorted-as-given absolute indices, the largest of them).
    """
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"indices={indices}: the last-n count must lie in 1..{num_features}")
        take = [num_features - indices + i for i in range(indices)]
    else:
        take = []
        for i in indices:
            idx = num_features + i if i < 0 else i
            if not 0 <= idx < num_features:
                raise ValueError(
                    f"feature index {i} is out of range for {num_features} features (0..{num_features - 1}, or negative from the end)"
                )
            take.append(idx)
    if not take:
        raise ValueError("indices selects no feature; pass None for all, an int n for the last n, or a list of indices")
    return take, max(take)


def stage_strides_and_dilations(output_stride: int, num_stages: int = 4) -> list[tuple[int, int, int]]:
    """(stride, first-unit dilation, dilation) of every stage for an overall `output_stride`, as timm builds it.

    Once the map reaches the output stride, a stage's stride 2 turns into dilation (x2 per stage);
    the first unit of a dilated stage keeps the previous stage's dilation (1 if it was 1 or 2, else 2).
    """
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride={output_stride} is not supported; choose one of {OUTPUT_STRIDES}")
    plan = []
    curr_stride, dilation = 4, 1  # the stem reduces by 4
    for i in range(num_stages):
        stride = 1 if i == 0 else 2
        if curr_stride >= output_stride:
            dilation *= stride
            stride = 1
        first_dilation = 1 if dilation in (1, 2) else 2
        plan.append((stride, first_dilation, dilation))
        curr_stride *= stride
    return plan


class FeatureInfo(list):
    """A list of per-output dicts (num_chs, reduction, module, index) with timm's FeatureInfo accessors."""

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None) -> list[dict]:
        rows = list(self) if idx is None else ([self[idx]] if isinstance(idx, int) else [self[i] for i in idx])
        if keys is None:
            return [dict(r) for r in rows]
        return [{k: r[k] for k in keys} for r in rows]

    def get(self, key: str, idx: int | Sequence[int] | None = None):
        if idx is None:
            return [r[key] for r in self]
        if isinstance(idx, int):
            return self[idx][key]
        return [self[i][key] for i in idx]

    def channels(self, idx=None):
        return self.get("num_chs", idx)

    def reduction(self, idx=None):
        return self.get("reduction", idx)

    def module_name(self, idx=None):
        return self.get("module", idx)
