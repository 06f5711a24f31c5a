import os

import torch

from testing_models import ROOT, model_dir  # noqa: F401  (re-exported for the tests of this folder)

torch.set_num_threads(int(os.environ.get("HYBRIDKV_TEST_THREADS", "1")))
