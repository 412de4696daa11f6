"""The serving engine: many requests at once over the paged KV pool.

``request.py``    ``SamplingParams``, ``Request``, ``RequestOutput``: a request's settings and state
``scheduler.py``  ``Scheduler``: continuous batching, chunked prefill, preemption by recompute
``runner.py``     ``ModelRunner``: the steps through the model's one forward; paged attention, CUDA graphs
``sampler.py``    ``sample_step``: a step's tokens on the device, each request from its own random stream (a hash of its seed and position)
``engine.py``     ``LLMEngine``: schedule, run, sample; asynchronous scheduling on a GPU

The memory side (block tables, prefix caching, the packed step as a cache) is
``kv_cache/paged/block_manager.py``.
"""

from .engine import LLMEngine
from .runner import ModelRunner
from .request import Request, RequestOutput, SamplingParams, Status
from .scheduler import Scheduler

__all__ = ["LLMEngine", "ModelRunner", "Request", "RequestOutput", "SamplingParams", "Scheduler", "Status"]
