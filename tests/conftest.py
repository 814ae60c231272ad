import os
import sys

import pytest
import torch

# tests import small helpers (reference_cell.py) that live beside them
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A tiny synthetic corpus: 40-word vocabulary, train/valid/test.txt."""
    d = tmp_path_factory.mktemp("corpus")
    g = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in range(40)]
    for split, lines in (("train", 300), ("valid", 60), ("test", 60)):
        with open(d / f"{split}.txt", "w", encoding="utf-8") as f:
            for _ in range(lines):
                n = int(torch.randint(3, 12, (1,), generator=g))
                f.write(" " + " ".join(words[int(i)] for i in torch.randint(40, (n,), generator=g)) + " \n")
    return str(d)
