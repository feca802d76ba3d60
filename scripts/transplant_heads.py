"""Put the heads a decoder-only run retrained into the model it started from: BASE's weights, tasks and
inference defaults, with the tensors under each PREFIX taken from DONOR (whose decoder widths, ``seg_channels``
and ``seg_full_channels``, the new model takes). A run on part of the data (e.g. only the embedded tasks) has
heads for that part only; this gives back one model with every task. The result is a checkpoint folder,
to fine-tune from (``--init OUT``), calibrate or evaluate.

Usage: python scripts/transplant_heads.py BASE DONOR OUT PREFIX [PREFIX ...]
Example: python scripts/transplant_heads.py medformer-medmnist-embedded-v2 runs/v3/tis3/checkpoints/best
         runs/v3/merged/best heads.tissue. heads.lesion_mask.
"""
import sys

from medexplore.models.medformer import Medformer
from medexplore.train.checkpoint import load_model, save_checkpoint

if len(sys.argv) < 5:
    sys.exit(__doc__)
base_name, donor_name, out, prefixes = sys.argv[1], sys.argv[2], sys.argv[3], tuple(sys.argv[4:])
base, meta = load_model(base_name)
donor, _ = load_model(donor_name)
config = base.config.replace(seg_channels=donor.config.seg_channels, seg_full_channels=donor.config.seg_full_channels)
model = Medformer(config, list(base.tasks.values()))
state = model.state_dict()
taken = {k: v for k, v in donor.state_dict().items() if k.startswith(prefixes)}
missing = [p for p in prefixes if not any(k.startswith(p) for k in taken)]
if missing:
    sys.exit(f"{donor_name}: no tensor starts with {missing}")
kept = {k: v for k, v in base.state_dict().items() if not k.startswith(prefixes)}
wrong = [k for k in kept if kept[k].shape != state[k].shape]
if wrong or set(taken) - set(state):
    sys.exit(f"{base_name}: outside {list(prefixes)} the widths differ ({wrong[:3]}) or the donor has other heads")
model.load_state_dict({**kept, **taken})
model.inference = base.inference
save_checkpoint(out, model, {k: v for k, v in meta.items() if k not in ("format", "model", "shipped")})
print(f"{out}: {base_name} with {len(taken)} tensors of {donor_name} ({', '.join(prefixes)})")
