import os
import sys

import torch

# Tests import helpers (tiny_models) from this folder.
sys.path.insert(0, os.path.dirname(__file__))
torch.use_deterministic_algorithms(True, warn_only=True)
