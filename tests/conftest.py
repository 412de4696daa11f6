"""Test-session settings.

The test models are tiny: one thread computes them fastest, and more threads only fight over
the (shared, 2-core) CI machine.  Tests that need another setting set it themselves.
"""

import torch

torch.set_num_threads(1)
