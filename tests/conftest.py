"""Test-session settings.

The test models are tiny: one thread computes them fastest, and on a shared 2-core machine a
second thread makes every parallel region wait for whichever thread was descheduled (measured:
a 100-token generation up to 100x slower).  Every test module therefore runs on one thread, and
the previous setting is restored after the module, so a test that changes it cannot leak.

Property tests (Hypothesis) draw the same examples on every run (``derandomize``), so a CI run
cannot fail on an example no earlier run saw; ``HYPOTHESIS_PROFILE=explore python -m pytest``
draws fresh random examples, to hunt for new edge cases (a failure prints the example to pin).
"""

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
