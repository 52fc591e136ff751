"""A few hundred fuzzed model files (tests/fuzz.py; `python -m tests.fuzz --inputs 10000` is the long run): each
loads or is refused with a CheckpointError, never a crash, a hang or another exception."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))
from tests import fuzz  # noqa: E402


def test_fuzzed_model_files_load_or_are_refused():
    outcomes, findings = fuzz.run(350, seed=2026)
    assert not findings, findings[:3]
    assert sum(outcomes.values()) == 350 and outcomes["refused"] > 100
