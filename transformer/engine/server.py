"""An OpenAI-compatible HTTP server in front of :class:`~transformer.engine.LLMEngine`.

Endpoints (FastAPI on uvicorn):

* ``POST /v1/completions`` -- ``prompt`` (text or token ids), ``max_tokens``, ``temperature``,
  ``top_p``, ``top_k``, ``seed``, ``stop`` (strings), ``n``, ``stream`` (server-sent events,
  ending ``data: [DONE]``);
* ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text: running and waiting
  requests, KV blocks used and free, prefix-cache hit rate, preemptions, tokens/s).

Threads.  The engine is not thread-safe and its steps block, so it runs in one background
thread (:class:`EngineLoop`); request handlers (asyncio) hand it commands through a queue and
receive each request's tokens on an ``asyncio.Queue``.  A client that disconnects mid-stream
cancels its handler, which aborts the request: its blocks are freed at the next step.  When the
waiting queue holds ``max_waiting`` requests the server answers 503 instead of queueing without
bound.  Errors are OpenAI-style: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx
status naming the field.

Start it with ``python generate.py --serve`` (the trained checkpoint) or
``python -m transformer.engine.server --checkpoint DIR``.
"""

# (no `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time)

import argparse
import asyncio
import json
import queue
import threading
import time
import uuid
from typing import Any, Dict, List, Optional

from .engine import LLMEngine
from .request import SamplingParams

_OPENAI_DEFAULT_TEMPERATURE = 1.0  # the OpenAI API samples unless told otherwise


class EngineLoop:
    """Runs ``engine.step()`` in a background thread and routes each request's tokens to its
    asyncio queue.  ``submit``/``abort`` are safe to call from the event loop."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: "queue.Queue" = queue.Queue()
        self._wake = threading.Event()
        self._sinks: Dict[str, tuple] = {}  # request id -> (event loop, asyncio.Queue)
        self._stop = False
        # requests submitted but not yet handed to the engine (counted as waiting): two counters,
        # each written by one thread only, so no lock is needed
        self._submitted = self._applied = 0
        self._lock = threading.Lock()  # guards engine.stats() against a step in progress
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> "EngineLoop":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self.thread.join(timeout=10)

    def submit(self, prompt_ids: List[int], params: SamplingParams):
        """Queue a request; returns ``(id, token queue, done, result)``: ``done`` is set once the
        engine thread has taken it, and ``result["error"]`` then holds the engine's refusal."""
        rid = uuid.uuid4().hex
        sink: asyncio.Queue = asyncio.Queue()
        done = threading.Event()
        result: Dict[str, Any] = {}
        self._submitted += 1
        self._commands.put(("add", rid, prompt_ids, params, (asyncio.get_running_loop(), sink), done, result))
        self._wake.set()
        return rid, sink, done, result

    def abort(self, rid: str) -> None:
        self._commands.put(("abort", rid))
        self._wake.set()

    def num_waiting(self) -> int:
        """Requests not running yet: in the engine's queue or on their way to it."""
        return len(self.engine.scheduler.waiting) + self._submitted - self._applied

    def stats(self) -> dict:
        with self._lock:
            s = self.engine.stats()
        s["waiting"] += self._submitted - self._applied
        s["uptime_s"] = time.monotonic() - self.started
        return s

    def _run(self) -> None:
        while not self._stop:
            while True:
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                with self._lock:
                    self._apply(cmd)
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            with self._lock:
                outputs = self.engine.step()
                finished = [o.request_id for o in outputs if o.finished]
                for rid in finished:
                    self.engine.pop_finished(rid)
            for o in outputs:
                sink = self._sinks.get(o.request_id)
                if sink is not None and (o.new_token_ids or o.finished):
                    sink[0].call_soon_threadsafe(sink[1].put_nowait, o)
                if o.finished:
                    self._sinks.pop(o.request_id, None)

    def _apply(self, cmd) -> None:
        if cmd[0] == "abort":
            rid = cmd[1]
            if self.engine.abort(rid):
                self.engine.pop_finished(rid)
            self._sinks.pop(rid, None)
            return
        _, rid, ids, params, sink, done, result = cmd
        self._applied += 1
        try:
            self.engine.add_request(ids, params, request_id=rid)
            self._sinks[rid] = sink
        except ValueError as e:
            result["error"] = str(e)
        done.set()


class APIError(Exception):
    """An OpenAI-style error: HTTP ``status``, ``message``, the offending ``param``."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def _number(body: dict, name: str, default, kind, low=None, high=None, low_open=False):
    v = body.get(name, default)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v <= high
    if not ok:
        rng = f" in {'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]" if low is not None else ""
        raise APIError(400, f"{name} must be {'a number' if kind is float else 'an integer'}{rng}, got {v!r}", name)
    return kind(v)


def parse_completion(body: Any, engine: LLMEngine, tokenizer, model_name: str):
    """Validate a ``/v1/completions`` body; return ``(prompt ids, [SamplingParams] * n, stop
    strings, stream)`` or raise :class:`APIError` naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if body.get("model", model_name) != model_name:
        raise APIError(404, f"model {body.get('model')!r} does not exist; this server serves {model_name!r}",
                       "model", "not_found_error")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if tokenizer is None:
            raise APIError(400, "this server has no tokenizer: send prompt as a list of token ids", "prompt")
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    else:
        raise APIError(400, f"prompt must be a string or a list of token ids, got {type(prompt).__name__}", "prompt")
    if not ids:
        raise APIError(400, "prompt must not be empty", "prompt")
    V, L = engine.config.vocab_size, engine.config.max_seq_len
    if any(not 0 <= t < V for t in ids):
        raise APIError(400, f"prompt token ids must be in [0, {V})", "prompt")
    if len(ids) >= L:
        raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context is {L} tokens", "prompt")
    max_tokens = _number(body, "max_tokens", 16, int, 1)
    if len(ids) + max_tokens > L:
        raise APIError(400, f"max_tokens={max_tokens} with a prompt of {len(ids)} tokens exceeds the model's "
                            f"context of {L} tokens (at most {L - len(ids)})", "max_tokens")
    temperature = _number(body, "temperature", _OPENAI_DEFAULT_TEMPERATURE, float, 0, 2)
    top_p = _number(body, "top_p", None, float, 0, 1, low_open=True)
    top_k = _number(body, "top_k", None, int, 1)  # an extension (vLLM's); -1 or 0 would mean off there
    seed = _number(body, "seed", None, int, 0)
    n = _number(body, "n", 1, int, 1, 16)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise APIError(400, "stop must be a non-empty string or a list of up to 4 of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}", "stream")
    eos = engine.eos_token_ids
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=None if seed is None else seed + i, stop_token_ids=eos) for i in range(n)]
    return ids, params, stop, stream


class _Text:
    """Turns one choice's tokens into text as they arrive, applying the stop strings."""

    def __init__(self, tokenizer, stop: List[str]):
        self.tokenizer, self.stop, self.ids, self.sent, self.stopped = tokenizer, stop, [], 0, False

    def add(self, ids: List[int]) -> str:
        """The new text these tokens complete (held back while a stop string may be forming)."""
        self.ids += ids
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                self.stopped, text = True, text[:at]
        safe = len(text) if self.stopped else len(text) - max((len(s) - 1 for s in self.stop), default=0)
        if not self.stopped and text.endswith("\ufffd"):  # a multi-byte character not complete yet
            safe = min(safe, len(text) - 1)
        out, self.sent = text[self.sent:max(safe, self.sent)], max(safe, self.sent)
        return out

    def finish(self) -> str:
        if self.tokenizer is None or self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)
        out, self.sent = text[self.sent:], len(text)
        return out


def build_app(engine: LLMEngine, tokenizer=None, model_name: str = "kvcache-model", max_waiting: int = 256):
    """The FastAPI application serving ``engine`` (started and stopped with the app)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    loop = EngineLoop(engine)
    app = FastAPI(title="kvcache-transformer server", on_startup=[loop.start], on_shutdown=[loop.stop])
    app.state.engine_loop = loop
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/health")
    async def health():
        return {"status": "ok" if loop.thread.is_alive() else "engine stopped"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "kvcache-transformer"}]}

    @app.get("/metrics")
    async def metrics():
        s = loop.stats()
        rows = [("requests_running", "gauge", "requests in the running batch", s["running"]),
                ("requests_waiting", "gauge", "requests waiting for memory or budget", s["waiting"]),
                ("kv_blocks_used", "gauge", "KV cache blocks referenced by a request", s["blocks_used"]),
                ("kv_blocks_free", "gauge", "KV cache blocks free (incl. cached prefix blocks)", s["blocks_free"]),
                ("prefix_cache_hit_rate", "gauge", "prompt tokens found in the prefix cache / prompt tokens",
                 s["prefix_hit_rate"]),
                ("preemptions_total", "counter", "requests preempted (recomputed later)", s["preemptions"]),
                ("generation_tokens_total", "counter", "tokens generated", s["generated_tokens"]),
                ("generation_tokens_per_second", "gauge", "tokens generated / uptime",
                 s["generated_tokens"] / max(s["uptime_s"], 1e-9))]
        text = "".join(f"# HELP kvcache_{n} {h}\n# TYPE kvcache_{n} {t}\nkvcache_{n} {v}\n" for n, t, h, v in rows)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}")
        ids, params, stop, stream = parse_completion(body, engine, tokenizer, model_name)
        if loop.num_waiting() + len(params) > max_waiting:
            raise APIError(503, f"the server is busy: {max_waiting} requests are already waiting; retry later",
                           kind="server_busy")
        subs = []
        try:
            for p in params:
                rid, sink, done, result = loop.submit(ids, p)
                subs.append(rid)
                await asyncio.get_running_loop().run_in_executor(None, done.wait)
                if "error" in result:
                    raise APIError(400, result["error"], "prompt")
                subs[-1] = (rid, sink)
        except BaseException:
            for s in subs:
                loop.abort(s if isinstance(s, str) else s[0])
            raise
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        texts = [_Text(tokenizer, stop) for _ in subs]
        usage = dict(prompt_tokens=len(ids) * len(subs), completion_tokens=0)

        async def choices_stream():
            """(index, text, finish_reason) as tokens arrive, over every choice."""
            pending = {i: sub for i, sub in enumerate(subs)}
            getters = {asyncio.ensure_future(sub[1].get()): i for i, sub in pending.items()}
            try:
                while getters:
                    done_set, _ = await asyncio.wait(getters, return_when=asyncio.FIRST_COMPLETED)
                    for fut in done_set:
                        i = getters.pop(fut)
                        out = fut.result()
                        usage["completion_tokens"] += len(out.new_token_ids)
                        t = texts[i]
                        piece = t.add(out.new_token_ids)
                        reason = out.finish_reason
                        if t.stopped and not out.finished:
                            loop.abort(subs[i][0])
                            reason = "stop"
                        elif out.finished:
                            piece += t.finish()
                        if reason is not None:
                            yield i, piece, reason
                            pending.pop(i)
                        else:
                            if piece:
                                yield i, piece, None
                            getters[asyncio.ensure_future(subs[i][1].get())] = i
            finally:
                for fut in getters:
                    fut.cancel()
                for i in pending:  # the client went away (or an error): free their blocks
                    loop.abort(subs[i][0])

        def chunk(i, text, reason):
            return {"text": text, "index": i, "logprobs": None, "finish_reason": reason}

        if stream:
            async def sse():
                async for i, text, reason in choices_stream():
                    payload = {"id": cid, "object": "text_completion", "created": int(time.time()),
                               "model": model_name, "choices": [chunk(i, text, reason)]}
                    yield f"data: {json.dumps(payload)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")

        parts: Dict[int, List[str]] = {i: [] for i in range(len(subs))}
        reasons: Dict[int, str] = {}
        async for i, text, reason in choices_stream():
            parts[i].append(text)
            if reason:
                reasons[i] = reason
        ids_out = [texts[i].ids for i in range(len(subs))]
        choices = []
        for i in range(len(subs)):
            c = chunk(i, "".join(parts[i]), reasons.get(i))
            c["token_ids"] = ids_out[i]  # an extension: the generated token ids
            choices.append(c)
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                "choices": choices, "usage": usage}

    return app


def serve(engine: LLMEngine, tokenizer=None, host: str = "127.0.0.1", port: int = 8000,
          model_name: str = "kvcache-model", max_waiting: int = 256) -> None:
    """Run the server until interrupted (uvicorn, one process)."""
    import uvicorn

    uvicorn.run(build_app(engine, tokenizer, model_name, max_waiting), host=host, port=port, log_level="warning")


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m transformer.engine.server --checkpoint DIR [--port N]``."""
    from ..checkpoint import load_model

    p = argparse.ArgumentParser(description="OpenAI-compatible completions server over the continuous-batching "
                                            "engine")
    add_server_arguments(p)
    p.add_argument("--checkpoint", default="checkpoints", help="run directory or checkpoint [checkpoints]")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    model, tokenizer, _ = load_model(args.checkpoint, device=args.device)
    run_server(model, tokenizer, args)
    return 0


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """The server's flags (shared by ``generate.py --serve``)."""
    g = p.add_argument_group("server (continuous batching, OpenAI-compatible API)")
    g.add_argument("--host", default="127.0.0.1", help="address to bind [127.0.0.1]")
    g.add_argument("--port", type=int, default=8000, help="port [8000]")
    g.add_argument("--num-blocks", type=int, default=1024, help="KV cache blocks (the memory budget) [1024]")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block [16]")
    g.add_argument("--max-num-seqs", type=int, default=32, help="most requests per step [32]")
    g.add_argument("--max-num-batched-tokens", type=int, default=512, help="most tokens per step [512]")
    g.add_argument("--max-waiting", type=int, default=256, help="waiting requests before answering 503 [256]")
    g.add_argument("--model-name", default="kvcache-model", help="the model id clients send [kvcache-model]")


def run_server(model, tokenizer, args) -> None:
    """Build the engine from parsed flags and serve until interrupted."""
    eos = getattr(tokenizer, "eos_ids", None) or None  # a Hugging Face folder's EOS ids, all of them
    engine = LLMEngine(model, num_blocks=args.num_blocks, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens, eos_token_id=eos)
    print(f"serving {args.model_name} on http://{args.host}:{args.port}/v1 "
          f"({args.num_blocks} KV blocks of {args.block_size} tokens)", flush=True)
    serve(engine, tokenizer, args.host, args.port, args.model_name, args.max_waiting)


if __name__ == "__main__":
    raise SystemExit(main())
