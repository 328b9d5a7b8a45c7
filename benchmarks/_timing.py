"""Measurement helpers shared by the speed benchmarks: interleaved timing, CPU time, machine load.

A ratio measured on a shared machine only means something if both sides saw the same load, and
a reader can only trust a table if it says how loaded the machine was. So:

* :func:`interleave` runs every path once per round, round after round (A, B, C, A, B, C, ...),
  so load from other processes hits every path alike; each path keeps all its samples.
* :class:`Sample` holds wall *and* CPU time (this process's threads plus finished children):
  CPU time well below wall x threads means the path waited (for the disk, or for CPU another
  process held).
* :class:`LoadMonitor` samples the 1-minute load average and (with psutil) the CPU time used by
  *other* processes while the benchmark runs; :meth:`LoadMonitor.note` is the line each table
  prints, and says "busy" when other processes used at least half a core on average.
"""

from __future__ import annotations

import os
import resource
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# Other processes using this many cores on average make a run "busy".
BUSY_CORES = 0.5


@dataclass(frozen=True)
class Sample:
    wall: float  # seconds
    cpu: float  # seconds of CPU (user + system) of this process and its finished children


def _cpu_now() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(fn: Callable[[], object]) -> Sample:
    """Wall and CPU seconds of one call of ``fn``."""
    c0, t0 = _cpu_now(), time.perf_counter()
    fn()
    return Sample(time.perf_counter() - t0, _cpu_now() - c0)


def interleave(paths: dict[str, Callable[[], object]], rounds: int, *, warmup: int = 0,
               log: Callable[[str], None] | None = None) -> dict[str, list[Sample]]:
    """Every path once per round, ``rounds`` rounds; all samples per path, in round order."""
    for _ in range(warmup):
        for fn in paths.values():
            fn()
    out: dict[str, list[Sample]] = {name: [] for name in paths}
    for r in range(rounds):
        for name, fn in paths.items():
            s = measure(fn)
            out[name].append(s)
            if log is not None:
                log(f"round {r}: {name}: {s.wall:.3f} s wall, {s.cpu:.3f} s CPU")
    return out


def best(samples: list[Sample]) -> Sample:
    """The fastest sample (least disturbed by other processes)."""
    return min(samples, key=lambda s: s.wall)


def median_ratio(a: list[Sample], b: list[Sample]) -> float:
    """Median over rounds of ``b.wall / a.wall`` (paired samples of one interleaved run)."""
    return statistics.median(y.wall / x.wall for x, y in zip(a, b, strict=True))


class LoadMonitor:
    """Samples the machine's load in a background thread while a benchmark runs.

    ``with LoadMonitor() as load: ...`` then ``load.note()``. Without psutil only the load
    average is known (which counts this benchmark's own threads too).
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.cores = os.cpu_count() or 1
        self.loadavg: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = self._c0 = 0.0
        self._busy0: float | None = None
        self.seconds = 0.0
        self.own_cores = 0.0  # this process (and children): average cores used
        self.other_cores: float | None = None  # everything else: average cores used

    @staticmethod
    def _machine_busy() -> float | None:
        """CPU seconds the whole machine has been busy (all cores), or None without psutil."""
        try:
            import psutil
        except ImportError:
            return None
        t = psutil.cpu_times()
        return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.loadavg.append(os.getloadavg()[0])

    def __enter__(self) -> LoadMonitor:  # noqa: PYI034 - Python 3.10 has no typing.Self
        self._t0, self._c0 = time.perf_counter(), _cpu_now()
        self._busy0 = self._machine_busy()
        self.loadavg = [os.getloadavg()[0]]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.seconds = max(1e-9, time.perf_counter() - self._t0)
        own = _cpu_now() - self._c0
        self.own_cores = own / self.seconds
        busy1 = self._machine_busy()
        if self._busy0 is not None and busy1 is not None:
            self.other_cores = max(0.0, (busy1 - self._busy0 - own) / self.seconds)

    @property
    def busy(self) -> bool:
        if self.other_cores is not None:
            return self.other_cores >= BUSY_CORES
        # Without psutil: the load average minus what this run itself kept busy.
        return statistics.mean(self.loadavg) - self.own_cores >= BUSY_CORES

    def note(self) -> str:
        """One sentence for the table: how loaded the machine was, and whether that is busy."""
        la = self.loadavg or [0.0]
        text = (f"load average {min(la):.1f}-{max(la):.1f} (mean {statistics.mean(la):.1f}) on "
                f"{self.cores} cores over {self.seconds:.0f} s; this benchmark used "
                f"{self.own_cores:.1f} cores on average")
        if self.other_cores is not None:
            text += f", other processes {self.other_cores:.1f}"
        verdict = ("**BUSY machine**: other processes competed for the CPUs, so absolute "
                   "figures are low and ratios noisy; rerun on a quiet machine"
                   if self.busy else "quiet machine")
        return f"Machine load during the run: {text}. {verdict}."


def cpu_cell(s: Sample) -> str:
    """``wall s (cpu s CPU)`` for a table cell."""
    return f"{s.wall:.3f} ({s.cpu:.3f} CPU)"


@dataclass(frozen=True)
class Paired:
    """Two paths timed in alternating rounds: per-call medians and the median per-round ratio."""

    a: Sample
    b: Sample
    ratio: float  # median over rounds of b.wall / a.wall


def paired(fa: Callable[[], object], fb: Callable[[], object], *, rounds: int, number: int,
           warmup: int = 2, settle: int = 0) -> Paired:
    """``number`` calls of ``fa`` then of ``fb``, ``rounds`` times (load hits both alike).

    ``settle``: untimed calls before each timed block. When both paths read more data than the
    CPU caches hold for two (two sessions' weights), the first call after a switch reloads its
    data from memory; that cost is the interleaving's, not the path's, and it would dilute the
    ratio towards 1."""
    for _ in range(warmup):
        fa()
        fb()
    sa, sb = [], []
    for _ in range(rounds):
        for fn, out in ((fa, sa), (fb, sb)):
            for _ in range(settle):
                fn()
            s = measure(lambda fn=fn: [fn() for _ in range(number)])
            out.append(Sample(s.wall / number, s.cpu / number))

    def med(ss: list[Sample]) -> Sample:
        return Sample(statistics.median(s.wall for s in ss), statistics.median(s.cpu for s in ss))

    return Paired(med(sa), med(sb), median_ratio(sa, sb))
