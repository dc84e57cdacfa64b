"""The request decoder under random and mutated input: the fast version of scripts/fuzz_requests.py (its long run
is in docs/USAGE.md)."""
import subprocess
import sys
from pathlib import Path


def test_fuzzed_requests_are_refused_clearly_or_decoded_within_the_limits():
    script = Path(__file__).parents[1] / "scripts" / "fuzz_requests.py"
    out = subprocess.run([sys.executable, str(script), "--examples", "300"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "300 inputs tried" in out.stdout and "no unexpected error" in out.stdout
