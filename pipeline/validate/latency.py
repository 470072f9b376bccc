"""Latency of a candidate SavedModel against the reference version, measured in one process.

Example::

    import numpy as np
    from tf_export_pipeline.validate.latency import measure_latency
    slow = lambda feeds: sum(range(20000))
    fast = lambda feeds: sum(range(5000))
    figures = measure_latency(slow, fast, {"features": np.zeros((8, 4), np.float32)}, rounds=15)
    print(figures["latency_ratio"], figures["candidate"]["batch_8"])

Both models are already loaded (in TF Serving's way, by the validation worker)
and warmed, so neither the first run's graph optimisation nor a load is
timed. Then rounds alternate between them, for the sample batch and for a batch
of one: in even rounds the candidate runs first, in odd rounds the reference,
so whatever else the machine is doing (another process on a shared core, a
burst of I/O) falls on both alike. Per model and batch size the median and p99
over the rounds are kept; the ratio of medians is robust to a few slow runs,
which is what makes the gate stable on a busy machine.

``latency_ratio`` is the larger of the two batch sizes' ratios: a model that is
slower only for single requests (a fixed cost added per call) or only for
batches (a cost per example) is slower for someone. A ratio above the limit is
measured again over three times the rounds before it counts, so one unlucky
measurement does not refuse a model.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

#: Rounds of a measurement: 30 medians of interleaved runs are stable within a few percent on a shared
#: 2-core machine, and cost about 60 runs per model.
DEFAULT_ROUNDS = 30
#: Runs of each model and batch size before timing: the first Session runs optimise the graph.
WARM_RUNS = 3
#: A measurement stops early after this long, once MIN_ROUNDS rounds are done: a large model's runs are
#: long beside the machine's jitter, so fewer rounds give as steady a median, and a publish (or each
#: checkpoint of a backfill) pays a few seconds, not minutes.
TIME_BUDGET_SECONDS = 2.0
MIN_ROUNDS = 10
#: The confirming measurement of a ratio above the limit runs this many times the rounds.
CONFIRM_FACTOR = 3

Runner = Callable[[dict], object]
Figures = dict[str, dict[str, float]]  # batch label -> {"median", "p99"} in milliseconds


def batches_of(inputs: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """The sample batch and its first row alone, by label (``batch_8``, ``batch_1``); one label when the
    samples hold one row."""
    rows = len(next(iter(inputs.values())))
    out = {f"batch_{rows}": inputs}
    if rows > 1:
        out["batch_1"] = {name: value[:1] for name, value in inputs.items()}
    return out


def _timed(run: Runner, feeds: dict) -> float:
    started = time.perf_counter()
    run(feeds)
    return time.perf_counter() - started


def _summary(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000.0
    return {"median": round(float(np.median(ms)), 4), "p99": round(float(np.percentile(ms, 99)), 4)}


def _rounds(candidate: Runner, reference: Runner | None, batches: dict, rounds: int
            ) -> tuple[Figures, Figures | None, int]:
    taken: dict[str, dict[str, list[float]]] = {"candidate": {k: [] for k in batches},
                                                "reference": {k: [] for k in batches}}
    deadline = time.monotonic() + TIME_BUDGET_SECONDS
    done = 0
    for index in range(rounds):
        if index >= MIN_ROUNDS and time.monotonic() > deadline:
            break
        order = [("candidate", candidate), ("reference", reference)]
        if index % 2:
            order.reverse()
        for label, feeds in batches.items():
            for who, run in order:
                if run is not None:
                    taken[who][label].append(_timed(run, feeds))
        done += 1
    cand = {label: _summary(times) for label, times in taken["candidate"].items()}
    ref = {label: _summary(times) for label, times in taken["reference"].items()} if reference else None
    return cand, ref, done


def _ratio(cand: dict, ref: dict | None) -> tuple[dict | None, float | None]:
    if ref is None:
        return None, None
    ratios = {label: round(cand[label]["median"] / ref[label]["median"], 4)
              for label in cand if ref[label]["median"] > 0}
    return ratios, (max(ratios.values()) if ratios else None)


def measure_latency(candidate: Runner, reference: Runner | None, inputs: dict[str, np.ndarray], *,
                    rounds: int = DEFAULT_ROUNDS, max_ratio: float | None = None) -> dict:
    """Median and p99 milliseconds per batch size of ``candidate`` (and ``reference``, when given), run
    on ``inputs`` and on its first row, interleaved; with a reference, the ratios of the medians.

    Returns ``{"rounds", "candidate": {label: {"median", "p99"}}, "reference": ... | None,
    "ratios": {label: r} | None, "latency_ratio": max ratio | None, "confirmed": bool}``; ``confirmed``
    says a first ratio above ``max_ratio`` was measured again (the figures are the second measurement's).
    A batch size either model does not take (a fixed batch dimension) is left out, under ``skipped``.
    """
    batches = batches_of(inputs)
    skipped = {}
    for label, feeds in list(batches.items()):
        try:
            for run in (candidate, reference):
                if run is not None:
                    for _ in range(WARM_RUNS):
                        run(feeds)
        except Exception as err:  # a model that takes only fixed batches: time the sizes it takes
            if len(batches) == 1:
                raise
            skipped[label] = f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"
            del batches[label]
    cand, ref, done = _rounds(candidate, reference, batches, rounds)
    ratios, worst = _ratio(cand, ref)
    confirmed = False
    if worst is not None and max_ratio is not None and worst > max_ratio:
        cand, ref, done = _rounds(candidate, reference, batches, rounds * CONFIRM_FACTOR)
        ratios, worst = _ratio(cand, ref)
        confirmed = True
    out = {"rounds": done, "candidate": cand, "reference": ref, "ratios": ratios, "latency_ratio": worst,
           "confirmed": confirmed}
    if skipped:
        out["skipped"] = skipped
    return out
