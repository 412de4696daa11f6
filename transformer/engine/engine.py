"""``LLMEngine``: many requests at once, continuous batching over the paged KV pool.

The loop, one :meth:`LLMEngine.step` at a time (nano-vllm's shape: scheduler, block manager,
model runner)::

    chunks = scheduler.schedule()              # who runs, how many tokens each (host)
    batch  = blocks.batch(chunks)              # where their keys go and which keys they read
    logits = model(ids, cache=batch, cache_position=batch.query_positions,
                   num_logits_to_keep=last)    # the model's one forward pass, all requests packed
    tokens = sample(logits, each request's own settings and random stream)

The model is the project's ordinary forward pass: the packed step is a cache
(:class:`~kv_cache.paged.block_manager.PagedBatch`) that reports each key's position and
sequence, and the model's one mask builder turns that into a block-diagonal causal mask.  There
is no engine-only model code.  Sampling is batched on the device (:mod:`.sampler`), each
request's noise a hash of its ``seed`` and the token's position, so a request's tokens do not
depend on which others share its steps -- up to float rounding of batched arithmetic, which
can flip a near-tie (measured: ``docs/serving.md``).

On a GPU the loop is **asynchronous** (``async_scheduling``): the tokens of step ``N`` are
copied back while the host already schedules step ``N + 1``, whose input ids are taken from
the device; the host only waits when it needs step ``N``'s values, by which time the GPU is
busy with step ``N + 1``.
"""

from __future__ import annotations

import itertools
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from kv_cache.paged.block_manager import BlockManager
from kv_cache.paged.block_pool import BlockPool

from ..model import DecoderOnlyTransformer
from .request import Request, RequestOutput, SamplingParams
from .runner import ModelRunner
from .sampler import sample_step
from .scheduler import Scheduler


class _Step(NamedTuple):
    """A launched step: its chunks, the rows that sampled, their tokens on the device, the host
    copy being made of them and the event that says it is done (CUDA)."""
    chunks: list
    due: List[int]
    tokens: Optional[torch.Tensor]
    host: Optional[torch.Tensor]
    event: Optional[object]


class LLMEngine:
    """Serve many generation requests with one model; see the module docstring.

    Args:
        model: a decoder-only model of this project (``DecoderOnlyTransformer``), on its device
            and dtype; the pool takes both.
        num_blocks: KV memory budget in blocks (never exceeded).  Memory:
            ``2 * n_layers * num_blocks * block_size * n_kv_heads * head_dim`` elements.
        block_size: tokens per block.
        max_num_seqs: most requests in one step.
        max_num_batched_tokens: most tokens in one step (prefill chunks + decode tokens).
        enable_prefix_caching: share the KV blocks of prompt prefixes seen before.
        eos_token_id: stops every request unless it sets its own ``stop_token_ids``: one id or a
            list (default: the model config's ``eos_token_id``); :attr:`eos_token_ids` is the tuple.
        attention: how steps read the history: ``"auto"`` (``"paged"``; on a CPU without a C
            compiler ``"rows"`` where its buffer fits, ``ModelRunner.rows_fit``, else
            ``"gather"``), ``"paged"`` (the blocks read in place: FlexAttention on a GPU, the C
            kernel of :mod:`transformer.cpu_attention` on a CPU), ``"rows"`` (each running
            request's keys also kept in a dense row, read in place by SDPA; costs a
            ``max_num_seqs x max_seq_len`` buffer beside the pool) or ``"gather"`` (copy each
            row's history, then SDPA); see :mod:`.runner`.
        cuda_graph: replay decode steps as CUDA graphs (default: on with ``"paged"`` on CUDA;
            holds one block of the pool for padding rows).
        async_scheduling: overlap the host's work with the device's: schedule and stage step
            ``N + 1`` while step ``N`` runs, its outputs returned one :meth:`step` later (see
            :meth:`step`; default: on for CUDA, where the GPU would otherwise wait for Python;
            off on a CPU, which does the two in turn anyway).

    Use: :meth:`add_request` then :meth:`step` until :meth:`has_unfinished` is False, or
    :meth:`generate` for a list of prompts.  Cost per step: one forward over the step's tokens,
    attention reading each request's own keys (``"gather"``: plus a copy of every running
    request's history per layer; ``"rows"``: plus a second write of each new token, and reads
    padded to the step's longest history).
    """

    def __init__(self, model, *, num_blocks: int = 256, block_size: int = 16, max_num_seqs: int = 32,
                 max_num_batched_tokens: int = 512, enable_prefix_caching: bool = True,
                 eos_token_id: Union[int, Sequence[int], None] = None, attention: str = "auto", cuda_graph: Optional[bool] = None,
                 async_scheduling: Optional[bool] = None):
        cfg = getattr(model, "config", None)
        if not isinstance(model, DecoderOnlyTransformer):
            raise ValueError("LLMEngine serves decoder-only models (DecoderOnlyTransformer); got "
                             f"{type(model).__name__}")
        for name, v in (("num_blocks", num_blocks), ("block_size", block_size), ("max_num_seqs", max_num_seqs),
                        ("max_num_batched_tokens", max_num_batched_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        p = next(model.parameters())
        self.model, self.config = model.eval(), cfg
        self.pool = BlockPool(num_layers=cfg.n_layers, num_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                              block_size=block_size, max_blocks=num_blocks, dtype=p.dtype, device=p.device,
                              preallocate=True)
        self.blocks = BlockManager(self.pool, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.blocks, attention=attention, cuda_graph=cuda_graph,
                                  max_num_seqs=max_num_seqs)
        self.async_scheduling = p.device.type == "cuda" if async_scheduling is None else bool(async_scheduling)
        self._in_flight: Optional[_Step] = None  # the launched step whose tokens are not read yet
        eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
        self.eos_token_ids: Tuple[int, ...] = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) \
            else (eos,)
        self.requests: Dict[str, Request] = {}
        self._arrivals = itertools.count()
        self.num_generated_tokens = self.num_prefill_tokens = self.num_steps = 0

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_ids: Sequence[int], params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None) -> str:
        """Queue a request; return its id.  Refuses (``ValueError`` naming the field) an empty
        prompt, token ids outside the vocabulary, ``prompt + max_tokens`` past the model's
        ``max_seq_len``, or a request whose tokens could never fit the pool."""
        params = SamplingParams() if params is None else params
        ids = [int(t) for t in (prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else prompt_ids)]
        V, L = self.config.vocab_size, self.config.max_seq_len
        if not ids:
            raise ValueError("prompt must hold at least one token, got an empty prompt")
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, vocab_size={V}), got {bad[:5]}")
        if len(ids) + params.max_tokens > L:
            raise ValueError(f"max_tokens={params.max_tokens} with a prompt of {len(ids)} tokens exceeds the "
                             f"model's context of {L} tokens; expected prompt + max_tokens <= {L}")
        need = -(-(len(ids) + params.max_tokens) // self.pool.block_size)
        if need > self.pool.max_blocks:
            raise ValueError(f"prompt + max_tokens = {len(ids) + params.max_tokens} tokens need {need} blocks; the "
                             f"pool has num_blocks={self.pool.max_blocks}")
        rid = str(next(self._arrivals)) if request_id is None else str(request_id)
        if rid in self.requests:
            raise ValueError(f"request_id={rid!r} is already in the engine")
        req = Request(rid, ids, params)
        # an unseeded request still gets its own stream, from torch's global RNG (torch.manual_seed
        # makes a whole run reproducible)
        req.seed = params.seed if params.seed is not None else int(torch.randint(0, 1 << 62, ()).item())
        self.requests[rid] = req
        self.scheduler.add(req)
        return rid

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its memory.  False if it is unknown or already finished."""
        req = self.requests.get(str(request_id))
        if req is None or req.finished:
            return False
        self.scheduler.finish(req, "abort")
        return True

    def has_unfinished(self) -> bool:
        """Is any request waiting or running, or a step's tokens still to be read?"""
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def pop_finished(self, request_id: str) -> Request:
        """Forget a finished request and return it (its output stays on the object)."""
        req = self.requests[str(request_id)]
        if not req.finished:
            raise ValueError(f"request {request_id!r} is not finished")
        return self.requests.pop(str(request_id))

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def step(self) -> List[RequestOutput]:
        """Run one scheduled step; return what each request in it produced.

        With ``async_scheduling`` the step's tokens stay on the device and are returned by the
        *next* call, which first launches the following step: the host schedules step ``N + 1``
        and stages its inputs while the GPU still runs step ``N`` (the next step's input ids
        are taken from the device).  A request that meets a stop token has then been scheduled
        once more; that extra token is discarded.  Without it, each call returns its own step."""
        chunks = self.scheduler.schedule()
        launched = self._launch(chunks) if chunks else None
        if not self.async_scheduling:
            return self._finish(launched) if launched else []
        previous, self._in_flight = self._in_flight, launched
        return self._finish(previous) if previous else []

    def _launch(self, chunks) -> "_Step":
        """Queue the forward passes and the sampling of ``chunks`` on the device; no host wait."""
        # Two calls of the model's forward: decode tokens as a (B, 1) batch (each row reads only
        # its own keys), prompt chunks packed into one (1, S) row (no padded queries).
        pending = self._in_flight.tokens if self._in_flight else None
        order, logits = [], []  # chunk indices, and their logits, group after group
        for packed, run in ((False, lambda c: self.runner.decode(c, pending)), (True, self.runner.prefill)):
            group = [i for i, (r, n) in enumerate(chunks) if (n > 1) == packed]
            if group:
                order += group
                logits.append(run([chunks[i] for i in group]))  # (len(group), V)
        logits = logits[0] if len(logits) == 1 else torch.cat(logits)
        due = []  # rows that reach the end of their known tokens: each samples one more
        for i, (r, n) in enumerate(chunks):
            r.num_computed += n
            self.blocks.commit(r.request_id, n)
            if r.num_computed == r.num_tokens:
                due.append(i)
        row = {i: k for k, i in enumerate(order)}
        rows = [row[i] for i in due]
        if due and rows != list(range(len(order))):  # (a decode-only step samples every row: no copy)
            logits = logits.index_select(0, torch.tensor(rows, dtype=torch.long, device=logits.device))
        tokens = sample_step(logits, [chunks[i][0] for i in due]) if due else None
        for j, i in enumerate(due):
            r = chunks[i][0]
            r.num_pending += 1
            r.pending_row = j
        host, event = tokens, None
        if self.pool.device.type == "cuda":  # read back without waiting: pinned memory + an event
            if tokens is not None:
                host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True).copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()  # also marks the step's input buffers free again (ModelRunner._stage)
        self.num_steps += 1
        return _Step(chunks, due, tokens, host, event)

    def _finish(self, step: "_Step") -> List[RequestOutput]:
        """Read a launched step's tokens (waiting for its GPU work only) and account for them."""
        if step.event is not None:
            step.event.synchronize()
        values = step.host.tolist() if step.host is not None else []
        due = dict(zip(step.due, values))
        outputs = []
        for i, (r, n) in enumerate(step.chunks):
            if i not in due:
                self.num_prefill_tokens += n
                if not r.finished:
                    outputs.append(RequestOutput(r.request_id, [], False))
                continue
            r.num_pending -= 1
            if r.finished:  # stopped by an earlier token or aborted: this one was never wanted
                continue
            token = due[i]
            self.num_generated_tokens += 1
            r.output_ids.append(token)
            if r.request_id in self.blocks.seqs:  # (not if it was preempted meanwhile)
                self.blocks.commit(r.request_id, 0, [token])
            stops = () if r.params.ignore_eos else r.params.stop_token_ids or self.eos_token_ids
            reason = "stop" if token in stops else "length" if len(r.output_ids) >= r.params.max_tokens else None
            if reason:
                self.scheduler.finish(r, reason)
            outputs.append(RequestOutput(r.request_id, [token], reason is not None, reason))
        return outputs

    # ------------------------------------------------------------------ convenience
    def generate(self, prompts: Iterable[Sequence[int]], params=None) -> List[List[int]]:
        """Run ``prompts`` (token id lists) to completion; their generated tokens, in order.
        ``params``: one :class:`SamplingParams` for all, or a list of one per prompt."""
        prompts = list(prompts)
        plist = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        rids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        while self.has_unfinished():
            self.step()
        return [self.pop_finished(r).output_ids for r in rids]

    def stats(self) -> dict:
        """Counters for monitoring (the server's ``/metrics``)."""
        bm = self.blocks
        return dict(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                    blocks_used=bm.num_used_blocks, blocks_free=bm.num_free_blocks,
                    blocks_total=self.pool.max_blocks, preemptions=self.scheduler.num_preemptions,
                    prefix_hit_rate=bm.prefix_hit_tokens / max(bm.prefix_query_tokens, 1),
                    generated_tokens=self.num_generated_tokens, steps=self.num_steps)

    def check_invariants(self) -> None:
        """Assert the pool's books balance and every running request holds its tokens (tests)."""
        self.blocks.check_invariants()
        running = {r.request_id for r in self.scheduler.running} | set(self.runner.held_sequences())
        assert running == set(self.blocks.seqs), "block tables and running requests disagree"
        for r in self.scheduler.running:
            assert self.blocks.length(r.request_id) == r.num_computed
        assert self.pool.capacity <= self.pool.max_blocks
