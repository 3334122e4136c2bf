"""Coverage-guided fuzzing of apply_diff with atheris (pip install atheris): the same
properties as fuzz.py (only DiffError, nothing outside touched, a refused archive changes
nothing), driven by libFuzzer's coverage feedback instead of hypothesis.

    python tests/campaigns/atheris_apply.py -atheris_runs=20000
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import atheris

with atheris.instrument_imports():
    import aufs  # noqa: F401
    from campaigns.fuzz import BASE_ARCHIVES, Arena

SCRATCH = tempfile.mkdtemp(prefix="aufs-atheris-")
ARENA = Arena(Path(SCRATCH))


def one_input(data: bytes) -> None:
    ARENA.check(data)


def main() -> None:
    corpus = Path(SCRATCH) / "corpus"
    corpus.mkdir()
    for index, seed in enumerate(BASE_ARCHIVES):
        (corpus / f"seed{index}").write_bytes(seed)
    atheris.Setup([*sys.argv, str(corpus)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
