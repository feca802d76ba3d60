"""Domain latents: each token's attention over the Input Adaptformer's dimensionality / modality / body-part
latents as overlays on the image, and each latent's mean weight as bars
(``medexplore.analysis.domain_attention_maps`` / ``domain_attention``; ``medexplore.viz.mixing_bars``).
For a GMoE-adapted checkpoint the gate's weight on each expert, per block, is drawn beside them
(``medexplore.analysis.gate_weights``)."""
from __future__ import annotations

import numpy as np
from magicgui.widgets import ComboBox, Container, Label, PushButton

from medexplore.analysis.mixing import domain_attention, domain_attention_maps, gate_weights, summarize_mixing
from medexplore.data.sample import Sample
from medexplore.data.transforms import prepare_image
from medexplore.errors import UserError
from medexplore.viz.analysis import mixing_bars

from ._common import CheckpointPicker, DomainFields, image_layers, report_error
from ._layers import layer_image, placement
from ._plots import MplCanvas

GROUP_COLORMAPS = {"dimensionality": "cyan", "modality": "magenta", "body_part": "yellow"}


class DomainLatentWidget(Container):
    def __init__(self, napari_viewer):
        self.viewer = napari_viewer
        self.checkpoint = CheckpointPicker()
        self.layer = ComboBox(label="image layer", choices=lambda _w: [(layer.name, layer) for layer in
                                                                       image_layers(self.viewer)], nullable=True)
        self.domain = DomainFields()
        self.run_button = PushButton(text="Show domain latents")
        self.status = Label(value="")
        self.plot = MplCanvas((4.5, 3.0))
        super().__init__(widgets=[self.checkpoint, self.layer, self.domain, self.run_button, self.status])
        self.native.layout().addWidget(self.plot.native)
        self.layer.changed.connect(self.domain.fill_from)
        self.run_button.changed.connect(self.run)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(lambda _e: self.layer.reset_choices())

    def run(self, _value=None):
        """Compute on the GUI thread (one forward pass); returns the added layers, or None on bad input."""
        try:
            source = self.layer.value
            if source is None:
                raise UserError("no image layer chosen")
            model, _ = self.checkpoint.load()
            domain = self.domain.domain
            image, _ = layer_image(source, domain, self.viewer.dims.current_step)
            spatial = image.shape[1:]
            sample = Sample(prepare_image(image, domain, pad_to=model.config.patch_sizes), domain,
                            meta={"source": source.name})
            maps = domain_attention_maps(model, sample)
            mixing = domain_attention(model, [sample])
            gates = gate_weights(model, [sample]) if (model.adaptation or {}).get("strategy") == "gmoe" else None
        except Exception as exc:
            self.status.value = report_error(exc, "domain latents")
            return None
        crop = tuple(slice(0, s) for s in spatial)
        where = placement(source, len(spatial))
        added = []
        for group, values in maps.items():
            name = f"{source.name} {group} latents"
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
            values = np.ascontiguousarray(values[crop], dtype=np.float32)
            added.append(self.viewer.add_image(values, name=name, colormap=GROUP_COLORMAPS[group], blending="additive",
                                               opacity=0.6, metadata={"group": group, "source_layer": source.name},
                                               **where))
        self.plot.figure.clear()
        axes = self.plot.figure.subplots(1, 2 if gates is not None else 1, squeeze=False)[0]
        mixing_bars(summarize_mixing(mixing, by="dimensionality", per="component"), ax=axes[0],
                    title=f"attention per domain latent ({domain.modality}, {domain.body_part})")
        if gates is not None:
            mixing_bars(summarize_mixing(gates, by="dimensionality", per="component"), ax=axes[1],
                        title="GMoE gate weight per block and expert")
        self.plot.draw()
        totals = mixing.by_group().iloc[0]
        self.status.value = "share per group: " + ", ".join(f"{g} {v:.2f}" for g, v in totals.items())
        if gates is not None:
            self.status.value += "; gate: " + ", ".join(f"{e} {v:.2f}" for e, v in gates.by_group().iloc[0].items())
        return added
