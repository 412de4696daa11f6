"""Where a run happens: the device, its precision, the CPU threads, the RNG state, the machine.

Training, generation and the benchmarks all ask the same questions about the machine they run
on; this module answers each once:

* :func:`resolve_device` -- ``"auto"`` picks CUDA, then Apple MPS, then the CPU.
* :func:`resolve_dtype`, :func:`autocast`, :func:`cpu_has_fast_bf16` -- bfloat16 autocast on
  CUDA and on CPUs with native bf16 matmuls, float32 elsewhere.
* :func:`available_cores`, :func:`set_threads`, :class:`ThreadTuner` -- how many torch threads
  to use, and switching to one thread while other programs make two slower.
* :func:`rng_state`, :func:`set_rng_state` -- the global random generators a training step
  draws from (dropout), saved in a checkpoint so a resumed run draws the same masks.
* :func:`cpu_model`, :func:`load_average`, :func:`machine_info` -- where a number was measured
  (``metrics.json``; ``benchmarks/common.py`` builds its machine description from the same helpers).
"""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Any, Dict, List, Optional

import torch

# --------------------------------------------------------------------------------------------
# Device and precision
# --------------------------------------------------------------------------------------------

def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available, else Apple MPS, else CPU; any other name is used as is."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} but CUDA is not available; use --device auto or cpu")
    return device


def cpu_has_fast_bf16() -> bool:
    """True if this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX-BF16 on Linux).

    Such CPUs (e.g. AMD Zen 4, Intel Sapphire Rapids) run bf16 matmuls about twice as fast as
    float32; on others bf16 is emulated and slower, so ``"auto"`` keeps float32 there.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype.  ``"auto"``: bfloat16 on CUDA GPUs that support it and on CPUs with
    native bf16 matmuls (:func:`cpu_has_fast_bf16`), float32 elsewhere (MPS, older CPUs)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the forward pass: matmuls in ``dtype``, weights and optimizer in fp32.

    bfloat16 keeps float32's exponent range, so no loss scaling is needed (unlike float16).
    Returns a no-op context for float32.
    """
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------
# CPU threads
# --------------------------------------------------------------------------------------------

def available_cores() -> int:
    """CPU cores this process may use: its affinity mask, or ``os.cpu_count()`` where the OS has none."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_threads(threads: int, world_size: int = 1) -> int:
    """Give torch ``threads`` intra-op threads (0 = the available cores shared by ``world_size``
    processes).  More threads than cores makes every matmul wait for descheduled threads."""
    n = threads or max(1, available_cores() // world_size)
    torch.set_num_threads(n)
    return n


class ThreadTuner:
    """Keep using whichever of ``max_threads`` or 1 torch threads is faster *right now*.

    On a quiet 2-core machine two threads run a training step about 1.8x faster than one.  But
    when other processes share the cores, every parallel region of a 2-thread step waits for
    whichever of its threads was descheduled, and one thread becomes 2-3x *faster* than two
    (measured on a shared 2-core VM: 10.7k vs 6.1k tokens/s quiet, 1.6k vs 4.1k busy).  So every
    ``probe_every`` steps one step runs with the other setting, and if it beat the median of the
    recent steps by 15% we switch (the first probe comes early, at step 10).  A quiet machine
    pays one slow step in ``probe_every``.

    Reproducibility: for the presets' models (RMSNorm, no biases) a training step gives bitwise
    identical results with 1 or 2 threads (the matmuls split work over output blocks, not over
    the reduction; tested), so a tuned run is as reproducible as a fixed one.  LayerNorm and
    bias gradients are reductions that *are* split across threads: for models with them, pass a
    fixed ``--threads`` to get bitwise-identical reruns.

    Use: ``tuner.before_step()``; time the step; ``tuner.after_step(seconds)``.
    """

    def __init__(self, max_threads: int, probe_every: int = 50):
        self.options = (max_threads, 1) if max_threads > 1 else (max_threads,)
        self.current, self.probe_every = max_threads, probe_every
        self.recent: list = []
        self.steps, self.next_probe = 0, 10
        self.probing = False
        self.steps_at = {n: 0 for n in self.options}

    def _other(self) -> int:
        return self.options[1] if self.current == self.options[0] else self.options[0]

    def before_step(self) -> int:
        """Set the thread count for the coming step and return it."""
        self.steps += 1
        self.probing = len(self.options) > 1 and self.steps >= self.next_probe and len(self.recent) >= 5
        if self.probing:
            self.next_probe = self.steps + self.probe_every
        n = self._other() if self.probing else self.current
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        self.steps_at[n] += 1
        return n

    def after_step(self, seconds: float) -> None:
        """Record how long the step took; switch if a probe was clearly faster."""
        if self.probing:
            typical = sorted(self.recent)[len(self.recent) // 2]
            if seconds < 0.85 * typical:
                self.current, self.recent = self._other(), []
        else:
            self.recent = (self.recent + [seconds])[-10:]


# --------------------------------------------------------------------------------------------
# RNG state (for exact resume)
# --------------------------------------------------------------------------------------------

def rng_state() -> Dict[str, Any]:
    """The global RNG states a training step may draw from (dropout): CPU, and CUDA if present."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only where CUDA exists)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# --------------------------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` on Linux, else what ``platform`` says)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def load_average() -> Optional[List[float]]:
    """The 1/5/15-minute load averages (``None`` where the OS has none).  A value near the core
    count *before* a measurement starts means other work competes for the CPU: expect noise."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info() -> Dict[str, Any]:
    """Where a run happened (for ``metrics.json``): CPU model, cores, GPU, torch version, date."""
    import datetime

    info = {"cpu": cpu_model(), "available_cores": available_cores(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    load = load_average()
    if load is not None:
        info["load_average_1m"] = load[0]  # > cores means other work shared the CPU
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
