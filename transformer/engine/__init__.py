"""The serving engine: many requests at once over the paged KV pool.

``request.py``    ``SamplingParams``, ``Request``, ``RequestOutput``: a request's settings and state
``scheduler.py``  ``Scheduler``: continuous batching, chunked prefill, preemption by recompute
``engine.py``     ``LLMEngine``: schedule, run the model's one forward over a packed step, sample

The memory side (block tables, prefix caching, the packed step as a cache) is
``kv_cache/paged/block_manager.py``.
"""

from .engine import LLMEngine
from .request import Request, RequestOutput, SamplingParams, Status
from .scheduler import Scheduler

__all__ = ["LLMEngine", "Request", "RequestOutput", "SamplingParams", "Scheduler", "Status"]
