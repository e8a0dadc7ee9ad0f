"""Settings for the whole test session."""

import os

import torch

# Triton reads TRITON_INTERPRET once, when it is first imported, and importing torch._dynamo (torch.compile)
# imports it: set it before any test module is collected, so that the Triton kernel tests run under the
# interpreter on a CPU machine whatever the test order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
