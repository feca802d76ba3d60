"""File > Open Sample: the embedded default's real anatomy at full size (``medexplore.data.examples``)."""
from __future__ import annotations

from medexplore.data import examples

from ._layers import domain_metadata


def _layers(example: examples.Example) -> list[tuple]:
    image = example.image
    meta = {"source": example.metadata.get("source"), "spacing": example.spacing, **domain_metadata(example.domain),
            "header": example.metadata.get("header", {})}
    common = {"scale": example.spacing}
    if image.shape[0] == 3 and example.domain.dimensionality == "2d":
        layers = [(image.transpose(1, 2, 0).astype("uint8"), {"name": example.name, "rgb": True, "metadata": meta,
                                                               **common}, "image")]
    else:
        layers = [(image[0], {"name": example.name, "metadata": meta, "colormap": "gray", **common}, "image")]
    if example.labels is not None:
        features = {"index": list(range(len(example.label_names))), "name": list(example.label_names)}
        layers.append((example.labels, {"name": f"{example.name} labels", "opacity": 0.4, "features": features,
                                         "metadata": {"label_names": list(example.label_names)}, **common}, "labels"))
    return layers


def mni152_t1():
    return _layers(examples.mni152_t1())


def mni152_with_lesions():
    return _layers(examples.mni152_with_lesions())


def ct_slice():
    return _layers(examples.ct_slice())


def retina_with_lesions():
    return _layers(examples.retina_with_lesions())
