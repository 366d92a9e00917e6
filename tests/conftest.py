import os
import sys

# Tests import the project's flat modules (model, moe, fp8, ...) from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """train.py's --data and --cache_dir for a small corpus: the first 60 KB of three plays."""
    import data
    root = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(data.corpus_text("shakespeare")[:3]):
        (root / f"play{i}.txt").write_text(text[:60_000])
    return [f"--data={root}/*.txt", f"--cache_dir={tmp_path_factory.mktemp('cache')}"]
