"""Every guard of the hardening work has a test that fails without it: the quick part of scripts/mutation_check.py
(the mutants whose tests take minutes are in its full report, docs/mutation/named.txt)."""
import subprocess
import sys
from pathlib import Path


def test_every_named_mutant_is_killed():
    script = Path(__file__).parents[1] / "scripts" / "mutation_check.py"
    out = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 SURVIVED, 0 BROKEN" in out.stdout, out.stdout
