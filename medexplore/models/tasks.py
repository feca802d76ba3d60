"""Task specifications: the small declarative record every head, loss and metric is built from."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import UserError

__all__ = ["TaskKind", "TaskSpec", "Domain", "DIMENSIONALITIES", "KINDS"]

DIMENSIONALITIES = ("2d", "3d")
KINDS: dict = {}  # kind name -> KindEntry, filled by medexplore.models.kinds (the one table of task kinds)


class TaskKind(str):
    """The name of a registered task kind (:mod:`medexplore.models.kinds`): decides its head, loss and metrics.

    The built-in kinds are class attributes (``TaskKind.BINARY == "binary"``).
    """

    BINARY: "TaskKind"
    MULTICLASS: "TaskKind"
    MULTILABEL: "TaskKind"
    ORDINAL: "TaskKind"
    REGRESSION: "TaskKind"
    SEGMENTATION: "TaskKind"
    DETECTION: "TaskKind"

    @property
    def value(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"TaskKind({str(self)!r})"


for _name in ("binary", "multiclass", "multilabel", "ordinal", "regression", "segmentation", "detection"):
    setattr(TaskKind, _name.upper(), TaskKind(_name))


@dataclass(frozen=True)
class Domain:
    """Where an image comes from: its dimensionality, modality and body part.

    Example:
        >>> Domain("3d", "mri", "brain").dims
        3
    """

    dimensionality: str
    modality: str = "unknown"
    body_part: str = "unknown"

    def __post_init__(self):
        if self.dimensionality not in DIMENSIONALITIES:
            raise UserError(
                f"Domain.dimensionality must be one of {DIMENSIONALITIES}, got {self.dimensionality!r}"
            )

    @property
    def dims(self) -> int:
        return 2 if self.dimensionality == "2d" else 3


@dataclass(frozen=True)
class TaskSpec:
    """One task of a multitask Medformer.

    Args:
        name: unique identifier, used as the key of predictions, labels and losses.
        kind: a :class:`TaskKind` (or its string value).
        num_outputs: classes for binary (1 or 2 logits are both accepted: use 1), multiclass,
            ordinal (number of grades) and segmentation (classes, background included);
            labels for multilabel; values for regression; maximum boxes for detection.
        dimensionalities: which of ``"2d"``/``"3d"`` the task applies to.
        modalities, body_parts: restrict the task to these domains (empty: any).
        num_queries: latent queries the task owns in the Output Adaptformer (0: automatic).
        label_names: optional names of the classes / labels / values.
        loss: loss variant where a kind offers several (regression: ``"huber"`` (default), ``"mse"``, or
            ``"l1"``, whose minimiser is the median: counts come out near whole numbers).
        weight: the task's weight in the summed multitask loss.

    Example:
        >>> TaskSpec("pneumonia", "binary", 1, dimensionalities=("2d",)).kind
        TaskKind('binary')
    """

    name: str
    kind: TaskKind
    num_outputs: int
    dimensionalities: tuple[str, ...] = DIMENSIONALITIES
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    num_queries: int = 0
    label_names: tuple[str, ...] = ()
    loss: str = ""
    weight: float = 1.0

    def __post_init__(self):
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise UserError(f"TaskSpec.name must be a non-empty identifier, got {self.name!r}")
        if str(self.kind) not in KINDS:
            raise UserError(f"task {self.name!r}: unknown kind {self.kind!r}; expected one of {sorted(KINDS)}")
        object.__setattr__(self, "kind", TaskKind(self.kind))
        entry = KINDS[self.kind]
        for attr in ("dimensionalities", "modalities", "body_parts", "label_names"):
            object.__setattr__(self, attr, tuple(getattr(self, attr)))
        bad = [d for d in self.dimensionalities if d not in DIMENSIONALITIES]
        if bad or not self.dimensionalities:
            raise UserError(f"task {self.name!r}: dimensionalities must be a non-empty subset of {DIMENSIONALITIES}, "
                             f"got {self.dimensionalities}")
        minimum = entry.min_outputs
        if self.kind == TaskKind.BINARY and self.num_outputs not in (1, 2):
            raise UserError(f"task {self.name!r}: a binary task has num_outputs 1 (or 2), got {self.num_outputs}")
        if self.num_outputs < minimum:
            raise UserError(f"task {self.name!r}: kind {self.kind.value} needs num_outputs >= {minimum}, got {self.num_outputs}")
        if self.label_names and len(self.label_names) != self.num_outputs and self.kind != TaskKind.BINARY:
            raise UserError(f"task {self.name!r}: {len(self.label_names)} label_names for num_outputs={self.num_outputs}")
        if self.num_queries < 0:
            raise UserError(f"task {self.name!r}: num_queries must be >= 0, got {self.num_queries}")
        if entry.queries_per_output and 0 < self.num_queries < self.num_outputs:
            what = "box" if entry.output == "boxes" else "class"
            raise UserError(f"task {self.name!r}: a {self.kind.value} task needs one query per {what} "
                             f"(num_queries >= num_outputs = {self.num_outputs}), got {self.num_queries}")
        losses = entry.losses
        if self.loss not in losses:
            raise UserError(f"task {self.name!r}: loss {self.loss!r} not available for {self.kind.value}; choose from {losses}")
        if not self.weight >= 0:
            raise UserError(f"task {self.name!r}: weight must be >= 0, got {self.weight}")

    @property
    def queries(self) -> int:
        """Latent queries in the Output Adaptformer: one per box or class where that is natural."""
        if self.num_queries:
            return self.num_queries
        return self.num_outputs if KINDS[self.kind].queries_per_output else 1

    def applies_to(self, domain: Domain) -> bool:
        return (
            domain.dimensionality in self.dimensionalities
            and (not self.modalities or domain.modality in self.modalities)
            and (not self.body_parts or domain.body_part in self.body_parts)
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = self.kind.value
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TaskSpec":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(f"TaskSpec: unknown field(s) {sorted(unknown)}")
        return cls(**d)
