"""The embedded default dataset: real anatomy that installs with packages, with synthetic lesions.

Sources (no network): nilearn's MNI152 2 mm T1 template with grey/white-matter maps and brain mask
(3D MRI patches and 2D MRI slices), scikit-image's retina and microaneurysms (fundus) and
immunohistochemistry (colon pathology) images, and pydicom's CT and MR test images.

Every image is image-centric and multi-annotated: synthetic lesions (smooth blobs brighter or
darker than the tissue) give ``lesion`` (presence, binary), ``lesion_count`` (regression),
``lesion_boxes`` (detection) and ``lesion_mask`` (segmentation); 3D brain patches also carry
``tissue`` (background / CSF and other / grey matter / white matter, from the nilearn maps).
Generation is deterministic from a seed and cached as one npz file.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit
from torch.utils.data import Dataset

from ..errors import UserError
from ..models.tasks import Domain, TaskSpec
from .cache import cache_dir
from .sample import Sample
from .transforms import normalize_intensity

__all__ = ["EmbeddedConfig", "EmbeddedDataset", "EMBEDDED_TASKS", "TISSUE_LABELS", "build_embedded", "cache_dir", "mni152",
           "add_lesions"]

VERSION = 6  # 2: lesion radii from lesion_radii (larger); 3: contrast 3-4 image SDs (was 1.2-2); 4: photographs saturate;
# 5: contrast in SDs of the tissue, every source saturates at its range, no invisible lesion (add_lesions limits);
# 6: version 4 by default (an MRI slice's brain mask now flips with it), version 5 as ``matched_lesions`` (a lesion
# flips sign only where that keeps more of it in sight)
TISSUE_LABELS = ("background", "csf and other", "grey matter", "white matter")
MAX_LESIONS = 3
PHOTOGRAPHS = ("fundus", "pathology")  # 8-bit colour photographs: inserted lesions saturate like the image
LESION_CONTRAST = (3.0, 4.0)  # lesion amplitude in units of the image's standard deviation (either sign)
EMBEDDED_TASKS = (
    TaskSpec("lesion", "binary", 1),
    TaskSpec("lesion_count", "regression", 1),
    TaskSpec("lesion_boxes", "detection", MAX_LESIONS),
    TaskSpec("lesion_mask", "segmentation", 2, label_names=("background", "lesion")),
    TaskSpec("tissue", "segmentation", 4, dimensionalities=("3d",), modalities=("mri",), body_parts=("brain",),
             label_names=TISSUE_LABELS),
)
SOURCES_2D = {  # name: (modality, body part)
    "mri_slice": ("mri", "brain"), "ct": ("ct", "head"), "mr": ("mri", "head"),
    "retina": ("fundus", "eye"), "microaneurysms": ("fundus", "eye"), "ihc": ("pathology", "colon"),
}


@dataclass(frozen=True)
class EmbeddedConfig:
    """Size of the embedded dataset; the defaults train within minutes on 2 CPU cores.

    ``size_2d`` / ``size_3d`` are the crop sides; ``background`` is the share of crops cut anywhere in the
    full-size image (air, skull, the black surround of a fundus photograph included) and kept lesion-free:
    the windows a sliding-window pass over a whole healthy image meets, which crops centred on tissue
    never show. ``matched_lesions`` draws lesions as whole-image inference meets them (and as the samples in
    :mod:`medexplore.data.examples` hold them): centred in the tissue, their contrast in SDs of that tissue, and
    saturating at the normalised source's range (a lesion that would vanish takes the other sign); off, their
    contrast is in SDs of the whole crop and only the 8-bit photographs saturate.
    """

    seed: int = 0
    per_source_2d: int = 80
    num_3d: int = 160
    size_2d: int = 32
    size_3d: int = 16
    lesion_free: float = 0.35
    background: float = 0.0
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15)
    matched_lesions: bool = False

    def __post_init__(self):
        for name in ("per_source_2d", "num_3d", "size_2d", "size_3d"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"embedded {name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("lesion_free", "background"):
            if not 0 <= float(getattr(self, name)) <= 1:
                raise UserError(f"embedded {name} must be a fraction in [0, 1], got {getattr(self, name)!r}")

    def key(self) -> str:
        text = json.dumps({"version": VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]




# ---------------------------------------------------------------------------- real sources
def mni152(resolution: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """nilearn's MNI152 T1 template ``(x, y, z)``, its tissue labels (:data:`TISSUE_LABELS`) and brain mask."""
    import warnings

    from nilearn.datasets import (
        load_mni152_brain_mask,
        load_mni152_gm_template,
        load_mni152_template,
        load_mni152_wm_template,
    )

    def arr(img):
        return np.asarray(img.get_fdata(), dtype=np.float32)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t1 = arr(load_mni152_template(resolution=resolution))
        gm = arr(load_mni152_gm_template(resolution=resolution))
        wm = arr(load_mni152_wm_template(resolution=resolution))
        mask = arr(load_mni152_brain_mask(resolution=resolution)) > 0.5
    tissue = np.where(mask, 1, 0).astype(np.uint8)
    tissue[mask & (gm > 0.5)] = 2
    tissue[mask & (wm > 0.5)] = 3
    return t1, tissue, mask


def _load_sources() -> dict:
    """Real images, intensity-normalised, channels first."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from skimage import data as skdata

    t1, tissue, mask = mni152(2)
    ct = dcmread(get_testdata_file("CT_small.dcm"))
    ct_hu = ct.pixel_array.astype(np.float32) * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    mr = dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.float32)
    retina = skdata.retina()[::4, ::4].astype(np.float32)  # 1411 -> 353 pixels across

    def norm(x, modality):
        return normalize_intensity(torch.from_numpy(np.ascontiguousarray(x)), modality).numpy()

    return {
        "t1": norm(t1[None], "mri"), "tissue": tissue, "brain": mask,
        "ct": norm(ct_hu[None], "ct"), "mr": norm(mr[None], "mri"),
        "retina": norm(retina.transpose(2, 0, 1), "fundus"),
        # a low-contrast grey fundus crop: the robust z-score (the default branch) suits it best
        "microaneurysms": norm(skdata.microaneurysms().astype(np.float32)[None], "unknown"),
        "ihc": norm(skdata.immunohistochemistry()[::2, ::2].astype(np.float32).transpose(2, 0, 1), "pathology"),
    }


def _crop(rng, volume: np.ndarray, size: int, dims: int, inside: np.ndarray | None):
    """A random (C, *size) crop whose centre lies in ``inside`` (if given); returns (crop, slices)."""
    spatial = volume.shape[1:]
    for _ in range(100):
        starts = [int(rng.integers(0, s - size + 1)) for s in spatial[-dims:]]
        slices = tuple(slice(a, a + size) for a in starts)
        if inside is None or inside[tuple(a + size // 2 for a in starts)]:
            break
    return volume[(slice(None), *slices)], slices


def lesion_radii(spatial: tuple[int, ...]) -> tuple[float, float]:
    """Radius range of the synthetic lesions: 1/10 to 1/5 of the shortest side, at least 2 to 2.5.

    At the demo's 32^2 (2D) and 16^3 (3D) crops with patch size 4, a lesion spans one to three patches,
    so the patch grid can see it and a box around it is a few tokens wide (radii of 1.5-2, i.e.
    3-voxel boxes inside one patch, were what kept lesion boxes at mAP 0).
    """
    side = min(spatial)
    return max(2.0, side / 10), max(2.5, side / 5)


def add_lesions(rng, image: np.ndarray, count: int, allowed: np.ndarray | None,
                radii: tuple[float, float] | None = None, contrast_within: np.ndarray | None = None,
                limits: tuple[float, float] | None = None):
    """Blend ``count`` smooth blobs into ``image``; returns (image, mask, boxes (count, 2d)). Their radii are
    drawn from ``radii`` (default :func:`lesion_radii` of the image), their amplitude in standard deviations
    of the image's pixels (of those in ``contrast_within`` when given: the tissue, not a black surround).

    ``limits`` is the range the image saturates at (an 8-bit photograph's black and white, the clip bounds of
    :func:`~medexplore.data.transforms.normalize_intensity`): the result is clipped to it, and a lesion whose
    centre saturation would flatten to under half its amplitude (a dark lesion on black, a bright one on the
    brightest tissue) takes the other sign where that keeps more of it, so every labelled lesion stays visible."""
    spatial = image.shape[1:]
    dims = len(spatial)
    low, high = lesion_radii(spatial) if radii is None else radii
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in spatial], indexing="ij"), -1).astype(np.float32)
    mask = np.zeros(spatial, np.uint8)
    boxes, centres = [], []
    scale = float(image.std() if contrast_within is None else image[:, contrast_within].std()) or 1.0
    for _ in range(count):
        for _attempt in range(50):
            r = float(rng.uniform(low, high))
            c = np.array([rng.uniform(r + 0.5, s - r - 0.5) for s in spatial])
            if allowed is not None and not allowed[tuple(c.astype(int))]:
                continue
            if all(np.linalg.norm(c - c2) > r + r2 + 1 for c2, r2 in centres):
                break
        else:
            break
        centres.append((c, r))
        dist = np.linalg.norm(grid - c, axis=-1)
        blob = expit((r - dist) * 3.0)
        amplitude = rng.choice([-1.0, 1.0]) * rng.uniform(*LESION_CONTRAST) * scale
        if limits is not None:
            centre = image[(slice(None), *c.astype(int))]
            kept, flipped = _visible_share(centre, amplitude, limits), _visible_share(centre, -amplitude, limits)
            amplitude = -amplitude if kept < 0.5 and flipped > kept else amplitude
        image = image + amplitude * blob[None]
        if limits is not None:
            image = np.clip(image, *limits)
        inside = dist <= r
        mask[inside] = 1
        idx = np.argwhere(inside)
        boxes.append(np.concatenate([idx.min(0), idx.max(0) + 1]).astype(np.float32))
    return image, mask, np.array(boxes, np.float32).reshape(-1, 2 * dims)


def _visible_share(centre: np.ndarray, amplitude: float, limits: tuple[float, float]) -> float:
    """The share of ``amplitude`` left at a pixel of values ``centre`` (per channel) after clipping to ``limits``."""
    return float(np.mean(np.abs(np.clip(centre + amplitude, *limits) - centre))) / abs(amplitude)


def _is_background(rng, config: EmbeddedConfig) -> bool:
    """Whether the next crop is a background crop (no draw at ``background=0``, so such data stays as it was)."""
    return bool(config.background) and bool(rng.random() < config.background)


def _lesion_count(rng, config: EmbeddedConfig, background: bool) -> int:
    lesion_free = rng.random() < config.lesion_free  # drawn for background crops too: one random stream
    return 0 if lesion_free or background else int(rng.integers(1, MAX_LESIONS + 1))


def _lesioned(rng, crop: np.ndarray, count: int, tissue: np.ndarray | None, limits: tuple[float, float],
              matched: bool, saturates: bool):
    """``crop`` with ``count`` lesions centred in ``tissue`` (anywhere when None). ``matched``: their contrast in
    SDs of that tissue (as :mod:`medexplore.data.examples` draws them), saturating at the normalised source's
    range ``limits`` (the crop is cut from a whole normalised image, so a lesion meets the clip bounds a whole
    image's normalisation sets, as in a sliding-window pass); else in SDs of the crop, clipped to ``limits``
    only where the source ``saturates`` (an 8-bit photograph)."""
    tissue = None if tissue is None else np.ascontiguousarray(tissue)
    if matched:
        within = tissue if tissue is not None and tissue.any() else None
        return add_lesions(rng, np.ascontiguousarray(crop), count, tissue, contrast_within=within, limits=limits)
    image, mask, boxes = add_lesions(rng, np.ascontiguousarray(crop), count, tissue)
    return (np.clip(image, *limits) if saturates else image), mask, boxes


def build_embedded(config: EmbeddedConfig = EmbeddedConfig()) -> dict[str, np.ndarray]:
    """Generate the dataset's arrays (deterministic from ``config.seed``)."""
    rng = np.random.default_rng(config.seed)
    src = _load_sources()
    s2, s3 = config.size_2d, config.size_3d
    images2d, ch2d, masks2d, mods2d, bodies2d, names2d = [], [], [], [], [], []
    brain_slices = src["brain"].transpose(2, 0, 1)  # axial slices: (z, x, y)
    slice_vol = src["t1"][0].transpose(2, 0, 1)
    for name, (modality, body) in SOURCES_2D.items():
        for _ in range(config.per_source_2d):
            anywhere = _is_background(rng, config)
            if name == "mri_slice":
                z = int(rng.integers(25, 70))
                img, sl = _crop(rng, slice_vol[z][None], s2, 2, None if anywhere else brain_slices[z])
                allowed = brain_slices[z][sl]
            else:
                inside = (src[name].mean(0) > src[name].mean(0).min() + 0.2) if name == "retina" else None
                img, sl = _crop(rng, src[name], s2, 2, None if anywhere else inside)
                allowed = None if inside is None or not config.matched_lesions else inside[sl]
            gain, offset = rng.uniform(0.8, 1.2), rng.uniform(-0.2, 0.2)
            img = img * gain + offset
            if rng.random() < 0.5:
                img, allowed = img[:, :, ::-1], None if allowed is None else allowed[:, ::-1]
            source = slice_vol if name == "mri_slice" else src[name]
            img, mask, boxes = _lesioned(rng, img, _lesion_count(rng, config, anywhere), allowed,
                                         (source.min() * gain + offset, source.max() * gain + offset),
                                         config.matched_lesions, modality in PHOTOGRAPHS)
            padded = np.zeros((3, s2, s2), np.float32)
            padded[:img.shape[0]] = img
            images2d.append(padded), ch2d.append(img.shape[0]), masks2d.append(mask)
            mods2d.append(modality), bodies2d.append(body), names2d.append((boxes, name))
    images3d, masks3d, tissue3d, boxes3d = [], [], [], []
    for _ in range(config.num_3d):
        anywhere = _is_background(rng, config)
        img, sl = _crop(rng, src["t1"], s3, 3, None if anywhere else src["brain"])
        tissue = src["tissue"][sl]
        if rng.random() < 0.5:
            img, tissue = img[:, ::-1], tissue[::-1]
        gain, offset = rng.uniform(0.8, 1.2), rng.uniform(-0.2, 0.2)
        img = img * gain + offset
        img, mask, boxes = _lesioned(rng, img, _lesion_count(rng, config, anywhere), np.ascontiguousarray(tissue) > 0,
                                     (src["t1"].min() * gain + offset, src["t1"].max() * gain + offset),
                                     config.matched_lesions, False)
        images3d.append(img), masks3d.append(mask), tissue3d.append(np.ascontiguousarray(tissue)), boxes3d.append(boxes)

    def pack_boxes(boxes_list, width):
        out = np.zeros((len(boxes_list), MAX_LESIONS, width), np.float32)
        counts = np.array([len(b) for b in boxes_list], np.int64)
        for i, b in enumerate(boxes_list):
            out[i, :len(b)] = b
        return out, counts

    b2, c2 = pack_boxes([b for b, _ in names2d], 4)
    b3, c3 = pack_boxes(boxes3d, 6)
    n2, n3 = len(images2d), len(images3d)
    split_rng = np.random.default_rng(config.seed + 1)

    def splits(n):
        cut = np.cumsum(np.array(config.splits) / sum(config.splits)) * n
        order = split_rng.permutation(n)
        out = np.zeros(n, np.int64)
        out[order[int(round(cut[0])):int(round(cut[1]))]] = 1
        out[order[int(round(cut[1])):]] = 2
        return out

    return {
        "images2d": np.stack(images2d).astype(np.float32), "channels2d": np.array(ch2d, np.int64),
        "masks2d": np.stack(masks2d), "boxes2d": b2, "counts2d": c2, "split2d": splits(n2),
        "modality2d": np.array(mods2d), "body2d": np.array(bodies2d), "source2d": np.array([n for _, n in names2d]),
        "images3d": np.stack(images3d).astype(np.float32), "masks3d": np.stack(masks3d), "tissue3d": np.stack(tissue3d),
        "boxes3d": b3, "counts3d": c3, "split3d": splits(n3),
    }


def load_or_build(config: EmbeddedConfig = EmbeddedConfig(), root: Path | None = None) -> dict[str, np.ndarray]:
    """The cached arrays, generated on first use (written atomically)."""
    root = Path(root) if root is not None else cache_dir()
    path = root / f"embedded-v{VERSION}-{config.key()}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except Exception:  # a damaged cache is rebuilt, never trusted
            path.unlink(missing_ok=True)
    arrays = build_embedded(config)
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return arrays


class EmbeddedDataset(Dataset):
    """One split of the embedded dataset as multi-annotated :class:`Sample` objects.

    Example:
        >>> ds = EmbeddedDataset("train")  # doctest: +SKIP
        >>> sorted(ds[0].labels)  # doctest: +SKIP
        ['lesion', 'lesion_boxes', 'lesion_count', 'lesion_mask']
    """

    SPLITS = ("train", "val", "test")

    def __init__(self, split: str = "train", config: EmbeddedConfig = EmbeddedConfig(), root=None):
        if split not in self.SPLITS:
            raise UserError(f"split must be one of {self.SPLITS}, got {split!r}")
        self.split, self.config = split, config
        arrays = load_or_build(config, root)
        code = self.SPLITS.index(split)
        self.index = [("2d", int(i)) for i in np.flatnonzero(arrays["split2d"] == code)] + \
                     [("3d", int(i)) for i in np.flatnonzero(arrays["split3d"] == code)]
        self.arrays = arrays
        self.tasks = list(EMBEDDED_TASKS)
        self.domains = list(dict.fromkeys(self.domain_of(k) for k in range(len(self.index))))

    def __len__(self) -> int:
        return len(self.index)

    def labels_of(self, k: int) -> dict:
        dims, i = self.index[k]
        a = self.arrays
        count = int(a[f"counts{dims}"][i])
        labels = {"lesion": int(count > 0), "lesion_count": torch.tensor([float(count)]),
                  "lesion_boxes": torch.from_numpy(a[f"boxes{dims}"][i, :count].copy()),
                  "lesion_mask": torch.from_numpy(a[f"masks{dims}"][i].astype(np.int64))}
        if dims == "3d":
            labels["tissue"] = torch.from_numpy(a["tissue3d"][i].astype(np.int64))
        return labels

    def domain_of(self, k: int) -> Domain:
        dims, i = self.index[k]
        if dims == "3d":
            return Domain("3d", "mri", "brain")
        return Domain("2d", str(self.arrays["modality2d"][i]), str(self.arrays["body2d"][i]))

    @property
    def patient_ids(self) -> list[str]:
        """Each sample's patient: the real subject its crop comes from (cheap, no image read)."""
        return [self.source_of(k) for k in range(len(self))]

    def source_of(self, k: int) -> str:
        dims, i = self.index[k]
        return "mni152_3d" if dims == "3d" else str(self.arrays["source2d"][i])

    def __getitem__(self, k: int) -> Sample:
        dims, i = self.index[k]
        if dims == "2d":
            image = torch.from_numpy(self.arrays["images2d"][i, :int(self.arrays["channels2d"][i])].copy())
            spacing = None
        else:
            image = torch.from_numpy(self.arrays["images3d"][i].copy())
            spacing = (2.0, 2.0, 2.0)
        source = self.source_of(k)
        # every crop of one source comes from one real subject (one template, photograph or scan)
        return Sample(image, self.domain_of(k), self.labels_of(k), spacing, patient_id=source,
                      meta={"source": source, "index": k})
