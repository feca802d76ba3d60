"""The embedded default's real sources at full size, for viewers (napari's File > Open Sample) and notebooks.

Each function returns an :class:`Example`: the image channels-first in (z, y, x) order, its spacing in
mm, its domain and, where there is one, a label map with the names of its values.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..models.tasks import Domain
from .embedded import TISSUE_LABELS, add_lesions, lesion_radii, mni152
from .readers import read_dicom
from .transforms import robust_limits

__all__ = ["Example", "mni152_t1", "mni152_with_lesions", "ct_slice", "retina_with_lesions", "EXAMPLES", "LESION_WINDOW"]

LESION_WINDOW = {"2d": 48, "3d": 28}  # the samples' lesions are sized as in crops of these sides (the shipped model's windows)


@dataclass
class Example:
    name: str
    image: np.ndarray  # (C, *spatial) float32
    spacing: tuple[float, ...]
    domain: Domain
    labels: np.ndarray | None = None  # (*spatial) integer map
    label_names: tuple[str, ...] = ()
    boxes: np.ndarray | None = None  # (K, 2 * dims) corners in pixels
    metadata: dict = field(default_factory=dict)


def mni152_t1(resolution: int = 2) -> Example:
    """The MNI152 T1 brain MRI (2 mm: 95 x 117 x 99 voxels) with its tissue labels."""
    t1, tissue, _ = mni152(resolution)
    zyx = (2, 1, 0)
    return Example("MNI152 T1", np.ascontiguousarray(t1.transpose(zyx))[None], (float(resolution),) * 3,
                   Domain("3d", "mri", "brain"), np.ascontiguousarray(tissue.transpose(zyx)), TISSUE_LABELS,
                   metadata={"source": "nilearn MNI152 template"})


def ct_slice() -> Example:
    """pydicom's CT test slice (128 x 128, in Hounsfield units) read through medexplore's DICOM reader."""
    from pydicom.data import get_testdata_file

    volume = read_dicom(get_testdata_file("CT_small.dcm"))
    return Example("CT slice", volume.array, volume.spacing, Domain("2d", "ct", "head"),
                   metadata={"source": volume.source, "header": volume.header})


def mni152_with_lesions(seed: int = 0, count: int = 3) -> Example:
    """The MNI152 T1 volume with ``count`` lesions inserted in the brain; labels are the lesion mask.

    As in the 3D training crops: radii for a :data:`LESION_WINDOW` ``3d`` window (2.8 to 5.6 voxels), amplitude
    3 to 4 SDs of the brain, and the range the volume's normalisation keeps (its 0.5 / 99.5 percentiles) as the
    saturation, so no lesion is flattened out of sight (see :func:`~medexplore.data.embedded.add_lesions`)."""
    base = mni152_t1()
    brain = base.labels > 0
    side = LESION_WINDOW["3d"]
    image, mask, boxes = add_lesions(np.random.default_rng(seed), base.image, count, brain,
                                     radii=lesion_radii((side,) * 3), contrast_within=brain,
                                     limits=robust_limits(torch.from_numpy(base.image)))
    return Example("MNI152 T1 with lesions", image.astype(np.float32), base.spacing, base.domain, mask,
                   ("background", "lesion"), boxes, metadata={"source": "nilearn MNI152 template"})


def retina_with_lesions(seed: int = 0, count: int = 3) -> Example:
    """scikit-image's fundus photograph (353 x 353 RGB) with ``count`` inserted lesions and their mask.

    The lesions have the size they have in a training crop of :data:`LESION_WINDOW` ``2d`` pixels (radii of 4.8
    to 9.6 pixels: a lesion is a local finding, not a fifth of the eye), their contrast in standard deviations
    of the fundus, not of the whole photograph with its black surround (which made them saturated discs), and
    they saturate at the photograph's black and white (a dark lesion that would vanish in black is bright)."""
    from skimage import data as skdata

    image = skdata.retina()[::4, ::4].astype(np.float32).transpose(2, 0, 1)
    inside = image.mean(0) > image.mean(0).min() + 20
    side = LESION_WINDOW["2d"]
    image, mask, boxes = add_lesions(np.random.default_rng(seed), image, count, inside,
                                     radii=lesion_radii((side, side)), contrast_within=inside, limits=(0.0, 255.0))
    return Example("retina with lesions", image.astype(np.float32), (1.0, 1.0),
                   Domain("2d", "fundus", "eye"), mask.astype(np.uint8), ("background", "lesion"), boxes,
                   metadata={"source": "scikit-image retina"})


EXAMPLES = {"mni152_t1": mni152_t1, "mni152_with_lesions": mni152_with_lesions, "ct_slice": ct_slice,
            "retina_with_lesions": retina_with_lesions}
