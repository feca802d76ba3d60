"""The benchmark scripts that need hardware CI lacks still parse their arguments and import what they run."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_checks_arguments_and_imports_then_stops():
    script = ROOT / "benchmarks" / "gpu_check.py"
    proc = subprocess.run([sys.executable, str(script), "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "steps: tests, throughput, varlen, compile, torchrun, inference" in proc.stdout
    assert "dry run: arguments and imports checked; nothing run" in proc.stdout
    bad = subprocess.run([sys.executable, str(script), "--dry-run", "--steps", "warp-drive"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "invalid choice: 'warp-drive'" in bad.stderr
