"""Hugging Face ``transformers``' own continuous batching, timed on the serving benchmark's workload.

What it is.  ``transformers`` (5.x) serves many requests at once with a ``ContinuousBatchingManager``:
a background thread that owns a paged KV cache (``num_blocks`` blocks of ``block_size`` tokens -- renamed
``page_size`` after 5.17 -- for every layer), a FIFO scheduler that packs prefill chunks and one token
per decoding request into each forward under a ``max_batch_tokens`` budget, and a paged attention path
(flash attention when installed, else SDPA or eager with an explicit mask).  Requests join and leave
the running batch every step, as in our :class:`transformer.engine.LLMEngine`.

How it is called here.  ``model.generate_batch(inputs, max_new_tokens=n)`` is the one-line entry, but it
gives every request the same ``n``; the workload gives each request its own output length.  So we use
the manager ``generate_batch`` is built on, with the same steps it takes::

    manager = model.init_continuous_batching(generation_config, continuous_batching_config, workload_hints)
    manager.warmup(); manager.start()                       # untimed, like the engine's warm-up
    manager.add_request(prompt_ids, max_new_tokens=o, eos_token_id=-1, record_timestamps=True)  # each request
    manager.get_result(timeout=...)                         # until every request is finished
    manager.stop()

``record_timestamps=True`` makes the loop thread stamp each token when it reaches the host, the same
moment our engine's loop stamps its tokens, so TTFT and ITL compare like with like.

Costs.  One Python thread and one queue hop per finished request on top of the forwards; warm-up
(cache allocation, a dummy forward at the largest batch, CUDA graph capture on GPU) is reported as
``warm_up_s``, not timed.  The cache is sized from free device memory unless ``num_blocks`` /
``max_batch_tokens`` are given -- give them: auto-sized on a CPU, warm-up alone takes tens of seconds.
The loop runs in the caller's inference mode where ``transformers`` lets it (5.24), under ``no_grad``
otherwise (5.17, whose loop thread cannot write a cache made in inference mode).

    from benchmarks.hf_continuous_batching import build_gpt2_pair, run_transformers_cb
    ours, hf = build_gpt2_pair(dict(n_layer=12, n_embd=768, n_head=12), "cuda", torch.bfloat16)
    row, tokens = run_transformers_cb(hf, reqs, num_blocks=1024, block_size=16, max_batch_tokens=512)
"""

from __future__ import annotations

import dataclasses
import inspect
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

Request = Tuple[Sequence[int], int]  # (prompt ids, max_new_tokens), as benchmarks.serving_benchmark.workload makes


def _torch_dtype(dtype: Union[torch.dtype, str]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype={dtype!r}; expected a torch.dtype or a name such as 'float32' or 'bfloat16'")
    return resolved


def build_gpt2_pair(config: dict, device: Union[str, torch.device], dtype: Union[torch.dtype, str],
                    seed: int = 0) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """``(our_model, hf_model)``: one random-weight GPT-2, as this project's model and as ``transformers``'.

    ``hf_model = GPT2LMHeadModel(GPT2Config(**config))`` is built under ``torch.manual_seed(seed)`` (the
    global RNG state is restored afterwards), saved with ``save_pretrained`` (``model.safetensors`` +
    ``config.json``) to a temporary folder, and read back by :func:`transformer.gpt2.load_gpt2_model`, so
    both models hold the same weights -- after rounding to ``dtype`` the same way.  Both are in eval mode on
    ``device``.  ``config`` takes ``GPT2Config``'s names (``n_layer``, ``n_embd``, ``n_head``, ``vocab_size``,
    ``n_positions``, ...); with a vocabulary smaller than GPT-2's, ``bos_token_id``/``eos_token_id`` default
    to ``None`` instead of 50256 (outside it).

    Cost: two copies of the weights on ``device`` plus one transient copy on disk.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from transformer.gpt2 import load_gpt2_model

    dtype = _torch_dtype(dtype)
    config = dict(config)
    if config.get("vocab_size", 50257) <= 50256:  # GPT-2's default special id 50256 would be out of range
        config.setdefault("bos_token_id", None)
        config.setdefault("eos_token_id", None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf_model = GPT2LMHeadModel(GPT2Config(**config))
    with tempfile.TemporaryDirectory(prefix="gpt2_pair_") as folder:
        hf_model.save_pretrained(folder)
        if not (Path(folder) / "model.safetensors").is_file():
            raise RuntimeError(f"save_pretrained wrote {sorted(p.name for p in Path(folder).iterdir())}; expected "
                               f"model.safetensors (this transformers version may not save safetensors by default)")
        ours = load_gpt2_model(folder, device=device, dtype=dtype)
    return ours, hf_model.to(device=device, dtype=dtype).eval()


def _collect(manager, request_ids: Sequence[str]) -> Dict[str, object]:
    """Block until every id in ``request_ids`` has a finished ``GenerationOutput``; raise on a failed one."""
    pending, results = set(request_ids), {}
    while pending:
        out = manager.get_result(timeout=1.0)
        if out is None:
            if not manager.is_running():
                raise RuntimeError(f"transformers' continuous batching thread stopped with {len(pending)} request(s) "
                                   f"unfinished (e.g. {sorted(pending)[:3]}); its log above says why")
            continue
        if out.request_id in pending and out.is_finished():
            if out.error is not None:
                raise RuntimeError(f"transformers' continuous batching failed request {out.request_id}: {out.error}")
            results[out.request_id] = out
            pending.discard(out.request_id)
    return results


def run_transformers_cb(hf_model, reqs: Sequence[Request], *, max_batch_tokens: Optional[int] = None,
                        num_blocks: Optional[int] = None, block_size: Optional[int] = None,
                        **cb_options) -> Tuple[Dict, List[List[int]]]:
    """Serve ``reqs`` with ``transformers``' continuous batching; return ``(row, tokens)``.

    Args:
        hf_model: a ``transformers`` causal LM (e.g. from :func:`build_gpt2_pair`), on its device and dtype.
        reqs: ``[(prompt_ids, max_new_tokens), ...]``, all arriving at t=0.  Every request is decoded
            greedily for exactly its ``max_new_tokens`` (EOS ignored: ``eos_token_id=-1``), each with its
            own length through ``manager.add_request`` (``generate_batch`` allows only one length per call).
        max_batch_tokens: most tokens (prefill chunks + one per decoding request) in one forward
            [``None``: transformers sizes it from free memory].
        num_blocks: KV cache blocks; one block holds ``block_size`` tokens of every layer, the same
            meaning as :class:`~transformer.engine.LLMEngine`'s [``None``: from free memory].
        block_size: tokens per block [``None``: transformers' default, 256].  Passed as ``page_size`` on
            transformers versions that renamed it, as ``block_size`` on older ones (5.17).
        **cb_options: any other ``ContinuousBatchingConfig`` field (``max_requests_per_batch``,
            ``use_cuda_graph``, ``allow_block_sharing``, ...); an unknown name raises ``TypeError``.

    Returns:
        ``row``: :func:`benchmarks.serving_benchmark.summarize`'s dict (wall time from the first
        ``add_request`` to the last finished result, output tokens/s, TTFT and ITL p50/p99) plus
        ``warm_up_s``, ``attn_implementation``, the resolved ``num_blocks`` / ``max_batch_tokens`` /
        ``block_size`` / ``use_cuda_graph``, ``transformers_version``, ``inference_mode`` (the loop's) and
        ``requests_without_full_timestamps``.
        ``tokens[i]``: the generated ids of request ``i`` (``max_new_tokens`` of them).

    TTFT and ITL come from per-token stamps the generation thread takes (``record_timestamps``), not from
    streaming.  A request the scheduler preempts is restarted as a new request state and loses the stamps
    of its earlier tokens: it then gives no TTFT and its ITLs skip the gap; their number is
    ``requests_without_full_timestamps`` (0 unless the cache was too small).

    Cost: the forwards plus one Python thread; the untimed warm-up allocates the cache (and captures
    CUDA graphs on GPU).  Raises ``RuntimeError`` if this ``transformers`` has no continuous batching, if
    a request fails, or if a request returns a number of tokens other than its ``max_new_tokens``.
    """
    import transformers
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from benchmarks.serving_benchmark import summarize  # here, not at the top: serving_benchmark may import us

    if not reqs:
        raise ValueError("reqs is empty; expected [(prompt_ids, max_new_tokens), ...]")
    if not hasattr(hf_model, "init_continuous_batching"):
        raise RuntimeError(f"transformers {transformers.__version__}: {type(hf_model).__name__} has no "
                           f"init_continuous_batching; this module was written against transformers 5.17-5.24")
    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    page_key = "page_size" if "page_size" in fields else "block_size"
    options = dict(cb_options)
    for key, value in (("max_batch_tokens", max_batch_tokens), ("num_blocks", num_blocks), (page_key, block_size)):
        if value is not None:
            options[key] = value
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"ContinuousBatchingConfig of transformers {transformers.__version__} has no field(s) "
                        f"{unknown}; it has {sorted(fields)}")
    max_new = max(o for _, o in reqs)
    generation_config = GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=-1)
    extra = {}
    try:  # sizing hints generate_batch passes too; same module in 5.17 and 5.24
        from transformers.generation.continuous_batching.utils import WorkloadHints
        extra["workload_hints"] = WorkloadHints(max_prompt_length=max(len(p) for p, _ in reqs),
                                                max_generated_length=max_new, num_requests=len(reqs))
    except ImportError:
        pass
    # Inference mode is per thread.  transformers 5.17 runs its loop thread under no_grad only, so a cache the
    # warm-up made in the caller's inference mode cannot be written there ("Inplace update to inference tensor
    # outside InferenceMode"); later versions start the loop in the caller's mode.  Keep the caller's mode only
    # where the loop inherits it.
    from transformers.generation.continuous_batching import ContinuousBatchingManager
    inherits = "use_inference_mode" in inspect.signature(ContinuousBatchingManager._run_generation_loop).parameters
    inference = torch.is_inference_mode_enabled() and inherits
    with torch.inference_mode(inference):
        manager = hf_model.init_continuous_batching(generation_config=generation_config,
                                                    continuous_batching_config=ContinuousBatchingConfig(**options),
                                                    **extra)
        attn = hf_model.config._attn_implementation  # the manager has switched it to a paged/flash path by now
        finished = False
        try:
            t_warm = time.perf_counter()  # a server does this before it takes requests
            manager.warmup()
            manager.start()
            _collect(manager, [manager.add_request([0] * 8, request_id="warm-up", max_new_tokens=2, eos_token_id=-1)])
            warm = time.perf_counter() - t_warm
            cfg = manager.continuous_batching_config  # num_blocks, max_batch_tokens resolved when the cache was made

            t0 = time.perf_counter()
            ids = [manager.add_request(list(p), request_id=f"req_{i}", max_new_tokens=o, eos_token_id=-1,
                                       record_timestamps=True) for i, (p, o) in enumerate(reqs)]
            if any(i is None for i in ids):
                raise RuntimeError("transformers' manager dropped a request (not accepting requests); see its log")
            results = _collect(manager, ids)
            wall = time.perf_counter() - t0
            finished = True
        finally:
            manager.stop(block=True, timeout=60, hard_stop=not finished)  # also restores the attention implementation
            manager.destroy()

    tokens, ttft, itl, partial = [], [], [], 0
    for rid, (_, o) in zip(ids, reqs):
        out = results[rid]
        if len(out.generated_tokens) != o:
            raise RuntimeError(f"transformers returned {len(out.generated_tokens)} tokens for {rid}; asked for {o} "
                               f"with EOS disabled")
        tokens.append(list(out.generated_tokens))
        stamps = list(out.timestamps or [])[:o]
        if len(stamps) == o:
            ttft.append(stamps[0] - t0)
        else:
            partial += 1
        itl += [b - a for a, b in zip(stamps, stamps[1:])]
    row = summarize(f"transformers continuous batching (add_request, {attn})", wall, sum(o for _, o in reqs), ttft, itl)
    row.update(warm_up_s=warm, attn_implementation=attn, num_blocks=cfg.num_blocks,
               max_batch_tokens=cfg.max_batch_tokens, block_size=getattr(cfg, page_key),
               use_cuda_graph=getattr(cfg, "use_cuda_graph", None), transformers_version=transformers.__version__,
               inference_mode=inference, requests_without_full_timestamps=partial)
    return row, tokens
