"""Copy a finished run's checkpoint into medexplore/pretrained/NAME (weights and meta only; the model card
is written by hand beside it). Usage: python scripts/ship_model.py RUN_DIR NAME"""
import json
import sys
from pathlib import Path

from medexplore.pretrained import FOLDER
from medexplore.train.checkpoint import export_checkpoint, final_checkpoint

run, name = Path(sys.argv[1]), sys.argv[2]
test = json.loads((run / "test_metrics.json").read_text()) if (run / "test_metrics.json").exists() else {}
card = FOLDER / name / "MODEL_CARD.md"
kept = card.read_text() if card.exists() else None  # the export replaces the folder; a new version keeps its card
out = export_checkpoint(final_checkpoint(run), FOLDER / name,
                        {"name": name, "from_run": run.name, "test_metrics": test})
if kept is not None:
    card.write_text(kept)
print(f"{out}: {sum(p.stat().st_size for p in out.iterdir()) / 1e6:.1f} MB")
