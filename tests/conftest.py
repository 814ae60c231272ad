import os
import sys

# tests import small helpers (reference_cell.py) that live beside them
sys.path.insert(0, os.path.dirname(__file__))
