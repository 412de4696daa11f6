"""The serving engine (``transformer.engine``) and its memory (``kv_cache.paged.block_manager``).

The proof that continuous batching changes nothing: at temperature 0 (float32) every request
gets exactly the tokens ``generate()`` gives its prompt alone, for random workloads (arrival
times, prompt and output lengths, shared prefixes, aborts) and a pool small enough to force
preemption; the pool's books balance after every step and nothing leaks at the end.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import tiny_decoder
from kv_cache.paged.block_manager import BlockManager
from kv_cache.paged.block_pool import BlockPool
from transformer.engine import LLMEngine, SamplingParams

V = 61


def alone(model, prompt, n, eos=None):
    """What ``generate()`` gives this prompt alone (greedy), as a list of new tokens."""
    out = model.generate(torch.tensor([prompt]), n, eos_token_id=eos)[0, len(prompt):].tolist()
    if eos is not None and eos in out:
        out = out[:out.index(eos) + 1]
    return out


MODELS = {pos: tiny_decoder("gqa", pos) for pos in ("learned", "rope")}


def run_workload(engine, arrivals, aborts=()):
    """Add ``arrivals`` = ``[(step, prompt, max_tokens), ...]`` at their steps, abort the ids in
    ``aborts`` = ``{step: [index]}``; check the invariants after every step; return outputs."""
    pending, rids, step = list(arrivals), {}, 0  # sorted by arrival step
    aborts = dict(aborts)
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            _, prompt, n = pending.pop(0)
            rids[len(rids)] = engine.add_request(prompt, SamplingParams(max_tokens=n))
        for i in aborts.get(step, ()):
            if i in rids:
                engine.abort(rids[i])
        engine.step()
        engine.check_invariants()
        step += 1
        assert step < 10_000
    assert engine.blocks.num_used_blocks == 0 and not engine.blocks.seqs  # nothing leaked
    return {i: engine.pop_finished(r) for i, r in rids.items()}


@pytest.mark.parametrize("attention", ["gather", "paged", "rows"])
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_engine_matches_generate_for_each_request(pos, attention):
    model = MODELS[pos]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (9,), generator=g)]
    engine = LLMEngine(model, num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=24,
                       attention=attention)
    outs = engine.generate(prompts, [SamplingParams(max_tokens=3 + i) for i in range(len(prompts))])
    for i, (p, out) in enumerate(zip(prompts, outs)):
        assert out == alone(model, p, 3 + i), i
    assert engine.num_steps > 1 and engine.blocks.num_used_blocks == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), pos=st.sampled_from(["learned", "rope"]), block_size=st.sampled_from([2, 4, 8]),
       num_blocks=st.integers(12, 40), max_seqs=st.integers(1, 6), budget=st.integers(4, 48),
       attention=st.sampled_from(["gather", "paged", "rows"]), async_scheduling=st.booleans())
def test_random_workloads_match_generate_with_preemption_and_prefix_sharing(data, pos, block_size, num_blocks,
                                                                           max_seqs, budget, attention,
                                                                           async_scheduling):
    model = MODELS[pos]
    base = data.draw(st.lists(st.integers(0, V - 1), min_size=0, max_size=12), label="shared prefix")
    n_req = data.draw(st.integers(1, 7), label="requests")
    arrivals = []
    for _ in range(n_req):
        tail = data.draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=10))
        prompt = (base + tail) if data.draw(st.booleans()) else tail
        n = data.draw(st.integers(1, 12))
        if -(-(len(prompt) + n) // block_size) > num_blocks:
            continue
        arrivals.append((data.draw(st.integers(0, 8)), prompt, n))
    arrivals.sort(key=lambda a: a[0])
    aborts = data.draw(st.dictionaries(st.integers(0, 10), st.lists(st.integers(0, 6), max_size=2), max_size=2))
    engine = LLMEngine(model, num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_seqs,
                       max_num_batched_tokens=budget, attention=attention, async_scheduling=async_scheduling)
    got = run_workload(engine, arrivals, aborts)
    for i, req in got.items():
        want = alone(model, arrivals[i][1], arrivals[i][2])
        if req.finish_reason == "abort":
            assert req.output_ids == want[:len(req.output_ids)]  # a prefix of the right answer
        else:
            assert req.output_ids == want and req.finish_reason == "length"


@pytest.mark.parametrize("attention,async_scheduling", [("gather", False), ("paged", False), ("rows", False), ("rows", True)])
def test_small_pool_forces_preemption_and_outputs_stay_exact(attention, async_scheduling):
    model = MODELS["rope"]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, V, (10,), generator=g).tolist() for _ in range(6)]
    engine = LLMEngine(model, num_blocks=12, block_size=4, max_num_seqs=6, max_num_batched_tokens=64,
                       attention=attention, async_scheduling=async_scheduling)
    outs = engine.generate(prompts, SamplingParams(max_tokens=20))
    assert engine.scheduler.num_preemptions > 0  # 6 x 30 tokens cannot all fit in 48 slots
    assert outs == [alone(model, p, 20) for p in prompts]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_seeded_sampling_survives_preemption(async_scheduling):
    """A request's noise is a hash of its seed and its token's position: preempted and recomputed
    (the pool too small for all six), each seeded request draws exactly the tokens it draws in
    a pool where nothing is preempted, and unseeded ones are reproducible under torch.manual_seed."""
    model = MODELS["rope"]
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, V, (10,), generator=g).tolist() for _ in range(6)]
    params = [SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=100 + i) for i in range(6)]
    small = LLMEngine(model, num_blocks=12, block_size=4, max_num_seqs=6, max_num_batched_tokens=64,
                      async_scheduling=async_scheduling)
    outs = small.generate(prompts, params)
    assert small.scheduler.num_preemptions > 0
    roomy = LLMEngine(model, num_blocks=64, block_size=4, max_num_seqs=6, max_num_batched_tokens=64)
    assert outs == roomy.generate(prompts, params) and roomy.scheduler.num_preemptions == 0
    assert len({tuple(o) for o in outs}) == 6  # six seeds, six different continuations
    unseeded = SamplingParams(max_tokens=8, temperature=1.0)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(LLMEngine(model, num_blocks=64, block_size=4).generate(prompts[:3], unseeded))
    assert runs[0] == runs[1] and runs[0][0] != runs[0][1]


def test_request_noise_is_a_function_of_seed_and_position_only():
    """The engine's noise row does not depend on the batch around it; it changes with the seed
    and with the token's position; its values lie strictly inside (0, 1)."""
    from transformer.fast_decode import fold_seed, request_noise

    seeds, counters = torch.tensor([5, 9, 5, 5]), torch.tensor([0, 0, 1, 0])
    batch = request_noise(seeds, counters, 300)
    for i in range(4):
        assert torch.equal(request_noise(seeds[i:i + 1], counters[i:i + 1], 300)[0], batch[i])
    assert torch.equal(batch[0], batch[3])  # the same seed and position: the same noise
    assert not torch.equal(batch[0], batch[1]) and not torch.equal(batch[0], batch[2])
    assert 0 < float(batch.min()) and float(batch.max()) < 1
    assert fold_seed(5) == 5 and fold_seed(5 + (1 << 32)) != 5 and 0 <= fold_seed(-3) < 1 << 32


def test_request_noise_int32_hash_is_the_int64_hash_bit_for_bit():
    """``request_noise`` hashes the ``S x vocab`` words in int32, in place; each row is exactly
    the int64 hash of ``uniform_noise`` (its row 1 for that seed and counter), for keys on both
    sides of 2^31 (where the int32 word is negative) and a vocabulary of no round size."""
    from transformer.fast_decode import request_noise, uniform_noise

    g = torch.Generator().manual_seed(4)
    seeds = torch.cat([torch.randint(0, 1 << 32, (30,), generator=g), torch.tensor([0, (1 << 32) - 1, 1 << 31])])
    counters = torch.randint(0, 1 << 20, (33,), generator=g)
    got = request_noise(seeds, counters, 5003)
    assert got.dtype == torch.float32 and got.shape == (33, 5003)
    for s in range(33):
        assert torch.equal(got[s], uniform_noise(seeds[s:s + 1], counters[s:s + 1], 2, 5003)[1]), s


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_step_of_prompt_chunks_only_samples_nothing(async_scheduling):
    """A long prompt under a small token budget: its first steps compute chunks and sample no token."""
    model = MODELS["rope"]
    prompt = list(range(1, 31))
    engine = LLMEngine(model, num_blocks=32, block_size=4, max_num_batched_tokens=8, async_scheduling=async_scheduling)
    rid = engine.add_request(prompt, SamplingParams(max_tokens=3))
    first = engine.step()
    assert first == [] if async_scheduling else [o.new_token_ids for o in first] == [[]]
    while engine.has_unfinished():
        engine.step()
    assert engine.pop_finished(rid).output_ids == alone(model, prompt, 3)


def test_prefix_cache_skips_the_shared_blocks():
    model = MODELS["learned"]
    prefix = list(range(1, 17))
    engine = LLMEngine(model, num_blocks=32, block_size=4)
    first = engine.generate([prefix + [20, 21]], SamplingParams(max_tokens=2))
    before = engine.num_prefill_tokens
    second = engine.generate([prefix + [30]], SamplingParams(max_tokens=2))
    # 16 shared tokens = 4 full blocks are revived; only the one new token is computed
    assert engine.blocks.prefix_hit_tokens == 16 and engine.num_prefill_tokens == before
    assert first[0] == alone(model, prefix + [20, 21], 2) and second[0] == alone(model, prefix + [30], 2)
    assert engine.stats()["prefix_hit_rate"] > 0


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_eos_and_stop_tokens_end_a_request(async_scheduling):
    model = MODELS["learned"]
    p = [5, 6, 7]
    ref = alone(model, p, 10)
    stop = ref[3]
    engine = LLMEngine(model, num_blocks=16, block_size=4, async_scheduling=async_scheduling)
    rid = engine.add_request(p, SamplingParams(max_tokens=10, stop_token_ids=[stop]))
    other = engine.add_request(p[:2], SamplingParams(max_tokens=8))
    while engine.has_unfinished():
        engine.step()
        engine.check_invariants()
    req = engine.pop_finished(rid)
    assert req.output_ids == ref[:ref.index(stop) + 1] and req.finish_reason == "stop"
    assert engine.pop_finished(other).output_ids == alone(model, p[:2], 8)
    # async: the step after the stop token was already launched; its token is dropped, its blocks freed
    assert engine.blocks.num_used_blocks == 0 and engine.num_generated_tokens == len(req.output_ids) + 8


def test_async_scheduling_reads_the_next_input_from_the_device_without_waiting():
    """The async loop launches step N + 1 before reading step N: the decode input ids of N + 1
    are the device tokens of N (nothing read back in between), and outputs arrive one call late."""
    model = MODELS["rope"]
    engine = LLMEngine(model, num_blocks=32, block_size=4, async_scheduling=True)
    rid = engine.add_request([3, 4, 5], SamplingParams(max_tokens=4))
    assert engine.step() == []  # prefill launched; its token still on the device
    req = engine.requests[rid]
    assert req.num_pending == 1 and req.output_ids == [] and req.token(3) is None
    first = engine.step()  # decode launched from the pending id, then the prefill's token read
    assert [o.new_token_ids for o in first] == [[alone(model, [3, 4, 5], 1)[0]]] and req.num_pending == 1
    while engine.has_unfinished():
        engine.step()
    assert engine.pop_finished(rid).output_ids == alone(model, [3, 4, 5], 4)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_seeded_sampling_does_not_depend_on_the_batch(async_scheduling):
    model = MODELS["rope"]
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=20, seed=7)
    alone_engine = LLMEngine(model, num_blocks=32, block_size=4)
    solo = alone_engine.generate([[1, 2, 3]], params)[0]
    busy = LLMEngine(model, num_blocks=64, block_size=4, max_num_seqs=8, async_scheduling=async_scheduling)
    others = [[9] * k for k in range(1, 6)]
    outs = busy.generate(others[:2] + [[1, 2, 3]] + others[2:],
                         [SamplingParams(max_tokens=9, temperature=0.8, seed=s) for s in range(2)] + [params]
                         + [SamplingParams(max_tokens=5, temperature=0.8, seed=s) for s in range(3)])
    assert outs[2] == solo
    assert LLMEngine(model, num_blocks=32, block_size=4).generate([[1, 2, 3]], params)[0] == solo  # reproducible


def test_bad_requests_are_refused_with_the_field_named():
    model = MODELS["learned"]  # max_seq_len 128
    engine = LLMEngine(model, num_blocks=8, block_size=4)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request([1, 2], SamplingParams(max_tokens=127))
    with pytest.raises(ValueError, match="num_blocks"):
        engine.add_request([1, 2], SamplingParams(max_tokens=40))  # 42 tokens > 8 blocks of 4
    with pytest.raises(ValueError, match="vocab_size"):
        engine.add_request([1, V], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request([], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="num_blocks"):
        LLMEngine(model, num_blocks=0)
    assert not engine.abort("no-such-request")


def test_block_manager_copy_on_write_and_free_list():
    pool = BlockPool(num_layers=1, num_kv_heads=1, head_dim=2, block_size=4, max_blocks=6, preallocate=True)
    bm = BlockManager(pool)
    assert bm.allocate("a", list(range(8))) == 0
    bm.slots("a", 8)
    bm.commit("a", 8)
    assert bm.num_used_blocks == 2 and bm.num_free_blocks == 4
    # the same 8 tokens: both full blocks are shared, 7 tokens count as cached (the last is recomputed)
    assert bm.allocate("b", list(range(8))) == 7
    assert bm.blocks_needed("b", 1) == 1  # writing token 7 copies the shared second block
    slots = bm.slots("b", 1)
    assert pool.stats["cow_copies"] == 1 and slots[0] // 4 not in bm.seqs["a"].blocks
    bm.commit("b", 1)
    bm.check_invariants()
    bm.free("a")
    bm.free("b")
    bm.check_invariants()
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 6


def test_a_request_that_waits_for_memory_is_counted_once_in_the_prefix_hit_rate():
    """The scheduler tries to admit the first waiting request every step; a try that does not
    fit must not count its prompt (a bug found by the notebook: hits were counted per try)."""
    model = MODELS["learned"]
    prefix = list(range(1, 9))
    engine = LLMEngine(model, num_blocks=6, block_size=4, max_num_batched_tokens=64)
    engine.generate([prefix + [20]], SamplingParams(max_tokens=1))  # leaves 2 full prefix blocks cached
    engine.blocks.prefix_query_tokens = engine.blocks.prefix_hit_tokens = 0
    a = engine.add_request([30] * 13, SamplingParams(max_tokens=10))  # needs the whole pool in the end
    b = engine.add_request(prefix + [21], SamplingParams(max_tokens=2))  # waits; its prefix is cached
    tries = 0
    while engine.has_unfinished():
        tries += bool(engine.scheduler.waiting) and engine.scheduler.waiting[0].request_id == b
        engine.step()
    assert tries > 1  # b was tried and refused at least once
    assert engine.blocks.prefix_query_tokens == 13 + 9  # each prompt counted once, however often tried
    assert engine.blocks.prefix_hit_tokens <= 8
    assert engine.pop_finished(b).output_ids == alone(model, prefix + [21], 2)
    assert engine.pop_finished(a).output_ids == alone(model, [30] * 13, 10)


def _decode_steps(model, prompts, steps, in_place, forward=None):
    """Prefill ``prompts`` (the first two share a block-aligned prefix), then ``steps`` greedy
    decode steps of all of them as one batch; the logits of every step, ``(steps, B, V)``."""
    pool = BlockPool(num_layers=model.config.n_layers, num_kv_heads=model.config.n_kv_heads,
                     head_dim=model.config.head_dim, block_size=4, max_blocks=48, preallocate=True)
    bm = BlockManager(pool)
    forward = forward or (lambda ids, cache: model(ids, cache=cache, cache_position=cache.query_positions))
    out = []
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            done = bm.allocate(i, p)
            step = bm.batch([(i, len(p) - done)], packed=True)
            model(torch.tensor([p[done:]]), cache=step, cache_position=step.query_positions)
            bm.commit(i, len(p) - done, [])
        ids = torch.tensor([[p[-1]] for p in prompts])
        for _ in range(steps):
            step = bm.batch([(i, 1) for i in range(len(prompts))], packed=False, in_place=in_place)
            logits = forward(ids, step)[:, -1]
            for i in range(len(prompts)):
                bm.commit(i, 1)
            ids = logits.argmax(-1, keepdim=True)
            out.append(logits)
    assert bm.prefix_hit_tokens == 8  # the second prompt revived the first one's two full blocks
    return torch.stack(out)


PROMPTS = [list(range(1, 12)), list(range(1, 9)) + [40, 41], [7, 8, 9]]


def test_paged_block_mask_is_the_block_table_and_the_one_mask_rule():
    from transformer.layers import attention_mask, paged_block_mask

    table = torch.tensor([[5, 2, -1], [7, -1, -1]], dtype=torch.int32)
    qpos = torch.tensor([[6], [1]])
    bm = paged_block_mask(qpos, table, block_size=4, num_blocks=8)
    # FlexAttention visits exactly each row's blocks, in table order
    assert bm.kv_num_blocks.flatten().tolist() == [2, 1]
    assert bm.kv_indices[0, 0, 0, :2].tolist() == [5, 2] and bm.kv_indices[1, 0, 0, :1].tolist() == [7]
    # the mask rule over all 32 slots: slot s of row b holds position table-index * 4 + s % 4 there
    slots = torch.arange(32)
    for b in range(2):
        pos = torch.full((32,), 10**6)  # a slot the row does not hold: after every query
        for j, blk in enumerate(table[b].tolist()):
            if blk >= 0:
                pos[blk * 4:(blk + 1) * 4] = torch.arange(4) + 4 * j
        want = attention_mask(qpos[b:b + 1], pos)[0, 0, 0]
        got = bm.mask_mod(torch.tensor(b), torch.tensor(0), torch.tensor(0), slots)
        assert torch.equal(got, want), b


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_attention_over_blocks_in_place_equals_the_gather(pos):
    model = MODELS[pos]
    want = _decode_steps(model, PROMPTS, 4, in_place=False)
    assert torch.allclose(_decode_steps(model, PROMPTS, 4, in_place=True), want, atol=1e-5)



def _decode_rows(model, prompts, steps):
    """:func:`_decode_steps` through a :class:`~kv_cache.paged.rows.RowBuffer`: the same keys,
    read from dense rows.  A sequence that came and left held row 1 (its 30 stale keys stay
    there, more than the prompt that gets the row next) and one that is still being prefilled
    holds row 0, so the first decode steps run rows 1, 2, 3 out of order with row 0 as padding;
    when that one leaves, the next step moves row 3 down into row 0 (compaction)."""
    from kv_cache.paged.rows import RowBuffer

    cfg = model.config
    pool = BlockPool(num_layers=cfg.n_layers, num_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, block_size=4,
                     max_blocks=48, preallocate=True)
    bm = BlockManager(pool, enable_prefix_caching=False)
    rows = RowBuffer(bm, rows=4, max_len=cfg.max_seq_len)

    def prefill(sid, p):
        done = bm.allocate(sid, p)
        step = bm.batch([(sid, len(p) - done)], packed=True)
        rows.attach(step, [(sid, len(p) - done)])
        model(torch.tensor([p[done:]]), cache=step, cache_position=step.query_positions)
        rows.advance(sid, len(p))
        bm.commit(sid, len(p) - done, p)

    out, layouts = [], []
    with torch.inference_mode():
        prefill("idle", [3] * 30)
        prefill("gone", [5] * 30)
        assert [rows.assign(s) for s in ("idle", "gone")] == [0, 1]
        bm.free("gone")
        bm.enable_prefix_caching = True  # the second prompt revives the first one's two full blocks
        for i in (2, 0, 1):  # row 1 is taken back from "gone", then rows 2 and 3
            prefill(i, prompts[i])
        assert [rows.row_of[i] for i in range(3)] == [2, 3, 1] and rows.filled[1] == len(prompts[2])
        ids = torch.tensor([[p[-1]] for p in prompts])
        for t in range(steps):
            if t == 2:
                bm.free("idle")
            step = rows.step([(i, 1) for i in range(len(prompts))])
            layouts.append((step.R, step.row_list))
            row_ids = torch.zeros(step.R, 1, dtype=torch.long).index_copy_(0, step.index, ids)  # padding: 0
            logits = model(row_ids, cache=step, cache_position=step.query_positions)[:, -1].index_select(0, step.index)
            for i in range(len(prompts)):
                rows.advance(i, bm.length(i) + 1)
                bm.commit(i, 1)
            ids = logits.argmax(-1, keepdim=True)
            out.append(logits)
    assert layouts == [(4, [2, 3, 1])] * 2 + [(3, [2, 0, 1])] * (steps - 2)
    assert bm.prefix_hit_tokens == 8
    return torch.stack(out)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_decode_over_dense_rows_equals_the_gather(pos):
    """``attention="rows"``: the keys read in place from a request's row (padding rows, rows out
    of order, a reused row's stale keys hidden by causality, prefix blocks copied in once, a row
    moved down when a lower one frees) give the logits the gathering step gives."""
    model = MODELS[pos]
    want = _decode_steps(model, PROMPTS, 4, in_place=False)
    assert torch.allclose(_decode_rows(model, PROMPTS, 4), want, atol=1e-5)


def test_a_rows_step_hands_attention_views_of_the_buffer_not_copies():
    from kv_cache.paged.rows import RowBuffer

    pool = BlockPool(num_layers=1, num_kv_heads=2, head_dim=4, block_size=4, max_blocks=8, preallocate=True)
    bm = BlockManager(pool)
    rows = RowBuffer(bm, rows=3, max_len=16)
    for sid, p in (("a", [1, 2, 3]), ("b", [4, 5])):
        bm.allocate(sid, p)
        bm.slots(sid, len(p))
        bm.commit(sid, len(p), [])
    step = rows.step([("b", 1), ("a", 1)])  # rows 0, 1: "b" was assigned first
    assert (step.R, step.N, step.dense) == (2, 4, True) and step.query_positions.flatten().tolist() == [2, 3]
    k, v = step.update(torch.ones(2, 2, 1, 4), torch.full((2, 2, 1, 4), 2.0), 0)
    assert k.shape == (2, 2, 4, 4) and k.untyped_storage().data_ptr() == rows.storage.untyped_storage().data_ptr()
    assert k[0, :, 2].eq(1).all() and v[1, :, 3].eq(2).all()  # each row's new key at its own position
    assert torch.equal(pool.read(0, step.write_slots)[0], torch.ones(2, 2, 4))  # and in the pool
    assert rows.nbytes == 2 * 1 * 3 * 2 * 16 * 4 * 4
    with pytest.raises(ValueError, match="one token per sequence"):
        rows.step([("a", 2)])
    with pytest.raises(ValueError, match="rows must be a positive int"):
        RowBuffer(bm, rows=0, max_len=16)
    short = RowBuffer(bm, rows=3, max_len=3)
    with pytest.raises(ValueError, match="would hold 4 tokens; a row holds max_len=3"):
        short.step([("a", 1)])

def test_compiled_model_reads_blocks_in_place_exactly():
    """torch.compile of the whole forward over a ``PagedBlocks`` step: the compiled FlexAttention
    kernel visits only the listed blocks (eager FlexAttention on a CPU scores every slot, so this
    is the test of the block-sparse layout), and the block mask is built outside the compiled
    graph (built inside it, torch 2.13's CPU kernels attended wrongly: errors of 0.1)."""
    model = MODELS["rope"]
    want = _decode_steps(model, PROMPTS, 3, in_place=False)
    compiled = torch.compile(lambda ids, cache: model(ids, cache=cache, cache_position=cache.query_positions))
    assert torch.allclose(_decode_steps(model, PROMPTS, 3, in_place=True, forward=compiled), want, atol=1e-5)


def test_a_packed_step_describes_its_mask_for_a_varlen_kernel_too():
    """A packed prompt step on a GPU goes to a variable-length attention kernel, which takes the
    mask as cumulative counts (causal aligned bottom-right).  Expanded, that is exactly the mask
    the one mask builder makes from the step's positions and sequences."""
    from transformer.layers import MaskPlan

    pool = BlockPool(num_layers=1, num_kv_heads=1, head_dim=4, block_size=4, max_blocks=16, preallocate=True)
    bm = BlockManager(pool)
    bm.allocate("a", list(range(10)))
    bm.slots("a", 6)
    bm.commit("a", 6, [])  # 6 tokens already in the pool: its chunk is the next 4, reading 10 keys
    bm.allocate("b", [1, 2, 3])
    bm.allocate("c", [4, 5, 6, 7, 8])
    step = bm.batch([("a", 4), ("b", 3), ("c", 5)], packed=True)
    cu_q, cu_k, max_q, max_k = step.varlen()
    assert cu_q.tolist() == [0, 4, 7, 12] and cu_k.tolist() == [0, 10, 13, 18] and (max_q, max_k) == (5, 10)
    dense = MaskPlan(step.query_positions, None, None, needed=True).build(step, 0)[0, 0]  # (12, 18) booleans
    want = torch.zeros(12, 18, dtype=torch.bool)
    for i in range(3):
        nq, nk = int(cu_q[i + 1] - cu_q[i]), int(cu_k[i + 1] - cu_k[i])
        for j in range(nq):  # query j of sequence i sees its first nk - nq + j + 1 keys
            want[cu_q[i] + j, cu_k[i]:cu_k[i] + nk - nq + j + 1] = True
    assert torch.equal(dense, want)


def test_auto_takes_the_cpu_paged_kernel_and_without_it_the_rows_only_where_their_buffer_fits(monkeypatch):
    """On a CPU ``"auto"`` reads the pool in place with the C kernel (``transformer.cpu_attention``),
    prompt chunks too.  Where no C compiler builds it: the row buffer, which reserves every
    row's longest length: fine for a short-context model, far more than the pool for a
    long-context one, where ``"auto"`` falls back to gathering."""
    from transformer import DecoderOnlyTransformer, ModelConfig, cpu_attention
    from transformer.engine.runner import ModelRunner

    engine = LLMEngine(MODELS["rope"], num_blocks=16, block_size=4)
    assert engine.runner.attention == "paged" and engine.runner.packed_in_place and engine.runner.rows is None
    monkeypatch.setattr(cpu_attention, "_lib", False)  # as if no compiler worked
    monkeypatch.setattr(cpu_attention, "_why", "no C compiler found (simulated)")
    small = LLMEngine(MODELS["rope"], num_blocks=16, block_size=4)
    assert small.runner.attention == "rows" and small.runner.rows.nbytes == ModelRunner.rows_bytes(
        MODELS["rope"], 32, 4)
    long_ctx = DecoderOnlyTransformer(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4,
                                                  max_seq_len=1 << 18, pos_encoding="rope")).eval()
    # 32 rows x 2^18 tokens x 2 layers x 32 channels x 2 x 4 bytes = 4 GiB: more than 256 MiB and the pool
    engine = LLMEngine(long_ctx, num_blocks=16, block_size=4)
    assert engine.runner.attention == "gather" and engine.runner.rows is None
    prompt = [1, 2, 3]
    assert engine.generate([prompt], SamplingParams(max_tokens=3))[0] == alone(long_ctx, prompt, 3)
