import os
import sys

import torch

# Tests import helpers (tiny_models) from this folder.
sys.path.insert(0, os.path.dirname(__file__))
torch.use_deterministic_algorithms(True, warn_only=True)
# Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads made them 30-100x slower.
torch.set_num_threads(1)
