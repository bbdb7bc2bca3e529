"""Timing and peak memory for ``laco bench``: interleaved cases, warm-up, repeats, medians and spread.

* CPU: ``time.perf_counter`` around the call; the thread count is part of the environment record.
* CUDA: ``torch.cuda.Event(enable_timing=True)`` pairs, with a ``synchronize`` before the start (so
  queued work of the previous case is not charged) and on the end event (kernels are asynchronous).
* Peak memory: CUDA ``max_memory_allocated`` after ``reset_peak_memory_stats``; CPU: the process's
  resident-set high-water mark (``VmHWM``), reset through ``/proc/self/clear_refs`` after
  ``malloc_trim`` hands freed heap back -- so it is the peak *RSS* of the whole process during the
  case (weights included) and ``delta`` is the growth over the RSS just before it.
* Process CPU time (``time.process_time``, all threads) is recorded beside the wall time: on a CPU
  shared with other jobs it counts the work this process did, not the time it waited for a core.
* Interleaving: every round times every case once; within a part the method order rotates from
  round to round, so slow phases of a shared machine hit all methods alike. The first ``warmup``
  rounds are discarded.
* Machine load, per round (``RoundRecord``): the load average at its start and end, its wall and
  process CPU time. With ``max_load``, a round first waits (up to ``max_wait_s``) until the 1-minute
  load average is at most ``max_load``; a round that still starts above it is marked ``over_max_load``.
  ``laco.bench.report`` flags loaded rounds and reports every speedup over all and over unflagged rounds.
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch


def summarize(samples: list[float]) -> dict[str, Any]:
    """Median and spread of timing samples (seconds): min, max, quartiles and IQR / median."""
    if not samples:
        raise ValueError("no timing samples to summarise")
    s = sorted(samples)
    med = statistics.median(s)
    q1, q3 = (statistics.quantiles(s, n=4, method="inclusive")[i] for i in (0, 2)) if len(s) > 1 else (s[0], s[0])
    return {"median": med, "mean": statistics.fmean(s), "min": s[0], "max": s[-1], "q1": q1, "q3": q3,
            "rel_iqr": (q3 - q1) / med if med > 0 else 0.0, "n": len(s), "samples": list(samples)}


class Timer:
    """Times one call on ``device`` (seconds)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def time(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        """(seconds, fn's return value)."""
        if not self.cuda:
            t0 = time.perf_counter()
            out = fn()
            return time.perf_counter() - t0, out
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0, out  # ms -> s


class Splits(dict):
    """Named sub-phase times (seconds) that a case's ``fn`` may return, e.g. forward+backward vs optimizer."""


_KB = 1024


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


class PeakMemory:
    """Peak memory of one case: ``start()`` before, ``stop() -> {"peak": bytes, "delta": bytes}`` after."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._base = 0
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss"
        self.available = self.device.type == "cuda" or self._can_reset_rss()

    @staticmethod
    def _can_reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _proc_status_kb("VmHWM") is not None
        except OSError:
            return False

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.available:
            _malloc_trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := current RSS
            self._base = (_proc_status_kb("VmRSS") or 0) * _KB

    def stop(self) -> dict[str, int] | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.available:
            peak = (_proc_status_kb("VmHWM") or 0) * _KB
        else:
            return None
        return {"peak": peak, "delta": max(0, peak - self._base)}


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class Case:
    """One timed thing: ``fn`` runs the work; ``reset`` (untimed) restores state after it (e.g. a KV cache)."""

    method: str
    part: str
    fn: Callable[[], Any]
    reset: Callable[[], Any] | None = None


@dataclass
class CaseResult:
    method: str
    part: str
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds (all threads)
    memory: list[dict[str, int]] = field(default_factory=list)
    splits: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "part": self.part, "time": summarize(self.times)}
        if self.cpu_times:
            out["cpu_time"] = summarize(self.cpu_times)
        if self.splits:
            out["splits"] = {k: summarize(v) for k, v in self.splits.items()}
        if self.memory:
            out["memory"] = {"peak": max(m["peak"] for m in self.memory), "delta": max(m["delta"] for m in self.memory)}
        return out


@dataclass
class RoundRecord:
    """One round of ``run_cases``: what the machine was doing while it ran."""

    index: int
    warmup: bool
    loadavg_start: list[float] | None  # 1/5/15-minute load averages (None where the OS has none)
    loadavg_end: list[float] | None
    wall_s: float  # the whole round, untimed work (gc, resets) included
    cpu_s: float  # process CPU seconds (all threads) over the round
    waited_s: float = 0.0  # time spent waiting for the load to drop under max_load
    over_max_load: bool = False  # started above max_load after waiting max_wait_s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def wait_for_load(max_load: float | None, max_wait_s: float, poll_s: float = 5.0) -> tuple[float, bool]:
    """Wait until the 1-minute load average is <= ``max_load`` (at most ``max_wait_s``): (waited s, still over)."""
    if max_load is None:
        return 0.0, False
    waited = 0.0
    while (load := loadavg()) is not None and load[0] > max_load:
        if waited >= max_wait_s:
            return waited, True
        time.sleep(poll_s)
        waited += poll_s
    return waited, False


def interleaved_order(cases: list[Case], round_index: int) -> list[Case]:
    """Cases grouped by part (first-seen order); within each part the method order rotates with the round."""
    parts: dict[str, list[Case]] = {}
    for c in cases:
        parts.setdefault(c.part, []).append(c)
    order = []
    for group in parts.values():
        k = round_index % len(group)
        order.extend(group[k:] + group[:k])
    return order


def run_cases(cases: list[Case], *, warmup: int = 1, repeats: int = 3, device: torch.device | str = "cpu",
              memory: bool = True, progress: bool = True, max_load: float | None = None,
              max_wait_s: float = 600.0) -> tuple[list[CaseResult], list[RoundRecord]]:
    """Time every case ``warmup + repeats`` times, interleaved; keep the last ``repeats`` rounds.

    Returns the per-case results (sample ``i`` of every case comes from timed round ``i``) and a
    ``RoundRecord`` per round, warm-up rounds included.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    keys = [(c.method, c.part) for c in cases]
    if len(set(keys)) != len(keys):
        raise ValueError("two cases share a (method, part) name")
    timer, mem = Timer(device), PeakMemory(device)
    results = {k: CaseResult(*k) for k in keys}
    records: list[RoundRecord] = []
    rounds = warmup + repeats
    bar = _progress(rounds * len(cases), enabled=progress)
    gc.collect()
    gc.freeze()  # the models' objects move to a permanent generation: the per-case collect stays cheap
    try:
        for r in range(rounds):
            waited, over = wait_for_load(max_load, max_wait_s)
            load0, w0, c0_round = loadavg(), time.perf_counter(), time.process_time()
            for case in interleaved_order(cases, r):
                bar.set_description(f"round {r + 1}/{rounds}{' (warm-up)' if r < warmup else ''} "
                                    f"{case.part}: {case.method}")
                gc.collect()
                if memory:
                    mem.start()
                c0 = time.process_time()
                t, out = timer.time(case.fn)
                cpu = time.process_time() - c0
                used = mem.stop() if memory else None
                if case.reset is not None:
                    case.reset()
                if r >= warmup:
                    res = results[(case.method, case.part)]
                    res.times.append(t)
                    res.cpu_times.append(cpu)
                    if isinstance(out, Splits):
                        for k, v in out.items():
                            res.splits.setdefault(k, []).append(v)
                    if used is not None:
                        res.memory.append(used)
                bar.update(1)
            records.append(RoundRecord(r, r < warmup, load0, loadavg(), time.perf_counter() - w0,
                                       time.process_time() - c0_round, waited, over))
    finally:
        gc.unfreeze()
        bar.close()
    return list(results.values()), records


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="case", leave=False)


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What the numbers depend on: device name, threads, library versions, load, platform."""
    import platform

    import transformers

    from laco._version import __version__

    device = torch.device(device)
    env: dict[str, Any] = {
        "device_type": device.type,
        "device_name": _device_name(device),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": loadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {"laco": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "memory_kind": PeakMemory(device).kind,
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def device_slug(device: torch.device | str = "cpu") -> str:
    """Folder name for results: 'cpu-amd-epyc-2t' / 'cuda-nvidia-h100-80gb-hbm3'."""
    device = torch.device(device)
    name = re.sub(r"[^a-z0-9]+", "-", _device_name(device).lower()).strip("-")
    slug = f"{device.type}-{name}" if name else device.type
    return f"{slug}-{torch.get_num_threads()}t" if device.type == "cpu" else slug
