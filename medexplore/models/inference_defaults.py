"""What a trained model's inference on a whole image uses unless told otherwise.

A model sees images of one size in training; on a larger image, inference slides windows of that size
(as many tokens as the largest training image of the same dimensionality), and turns box scores and mask
probabilities into boxes and masks at thresholds calibrated on validation data
(:func:`medexplore.train.calibration.calibrate_inference`), which also sets the score a mask's region needs
and reads a detection task's boxes off the mask task of the same finding when those score better
(:mod:`medexplore.models.findings`).
The defaults travel with the model in its
checkpoint (``meta.json``, ``model.inference``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import UserError

__all__ = ["InferenceDefaults", "DEFAULT_BOX_THRESHOLD"]

DEFAULT_BOX_THRESHOLD = 0.5  # box score threshold of a model without calibration
DIMENSIONALITIES = ("2d", "3d")


@dataclass(frozen=True)
class InferenceDefaults:
    """``max_tokens``: per dimensionality (``"2d"``, ``"3d"``), the tokens of a sliding window;
    ``box_thresholds``: per detection task, the score a box needs; ``mask_thresholds``: per two-class
    segmentation task, the foreground probability a pixel needs (instead of the argmax);
    ``region_thresholds``: per two-class segmentation task, the mean probability a connected region needs
    to be kept; ``region_min_sizes``: per two-class segmentation task and dimensionality, the fewest pixels
    a region needs to be kept; ``paired_masks``: per detection task, the mask task its boxes are read off
    (:mod:`medexplore.models.findings`)."""

    max_tokens: dict[str, int] = field(default_factory=dict)
    box_thresholds: dict[str, float] = field(default_factory=dict)
    mask_thresholds: dict[str, float] = field(default_factory=dict)
    region_thresholds: dict[str, float] = field(default_factory=dict)
    paired_masks: dict[str, str] = field(default_factory=dict)
    region_min_sizes: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self):
        for dims, tokens in self.max_tokens.items():
            if dims not in DIMENSIONALITIES or isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
                raise UserError(f"inference max_tokens: {dims!r}: {tokens!r} (want a positive integer for '2d' or '3d')")
        for kind, thresholds in (("box_thresholds", self.box_thresholds), ("mask_thresholds", self.mask_thresholds),
                                 ("region_thresholds", self.region_thresholds)):
            for task, value in thresholds.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                    raise UserError(f"inference {kind}: task {task!r}: {value!r} is not a probability in [0, 1]")
        for task, sizes in self.region_min_sizes.items():
            if not isinstance(sizes, dict) or not all(
                    dims in DIMENSIONALITIES and not isinstance(size, bool) and isinstance(size, int) and size >= 1
                    for dims, size in sizes.items()):
                raise UserError(f"inference region_min_sizes: task {task!r}: {sizes!r} (want {{'2d' or '3d': "
                                "a positive number of pixels}})")
        for task, mask in self.paired_masks.items():
            if not isinstance(mask, str) or not mask or mask == task:
                raise UserError(f"inference paired_masks: task {task!r}: {mask!r} is not the name of another task")

    def __bool__(self) -> bool:
        return bool(self.max_tokens or self.box_thresholds or self.mask_thresholds or self.region_thresholds
                    or self.paired_masks or self.region_min_sizes)

    def box_threshold(self, task: str) -> float:
        return float(self.box_thresholds.get(task, DEFAULT_BOX_THRESHOLD))

    def mask_threshold(self, task: str) -> float:
        """The foreground probability a pixel of two-class mask ``task`` needs (0.5, the argmax, uncalibrated)."""
        return float(self.mask_thresholds.get(task, 0.5))

    def region_min_size(self, task: str, dims: str) -> int:
        """The fewest pixels a region of two-class mask ``task`` needs in a ``dims`` image (1: every region)."""
        return int(self.region_min_sizes.get(task, {}).get(dims, 1))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "InferenceDefaults":
        data = dict(data or {})
        unknown = sorted(set(data) - {"max_tokens", "box_thresholds", "mask_thresholds", "region_thresholds",
                                      "paired_masks", "region_min_sizes"})
        if unknown:
            raise UserError(f"inference defaults: unknown key(s) {unknown}")
        return cls(dict(data.get("max_tokens") or {}), dict(data.get("box_thresholds") or {}),
                   dict(data.get("mask_thresholds") or {}), dict(data.get("region_thresholds") or {}),
                   dict(data.get("paired_masks") or {}),
                   {task: dict(sizes) if isinstance(sizes, dict) else sizes
                    for task, sizes in (data.get("region_min_sizes") or {}).items()})
