"""Chaos on local disk: `tf-export run|backfill|gc` SIGKILLed at random instants, then convergence.

While processes are killed at random (see tests/support/chaos.py), a watcher
applies TF Serving's rule the whole time: every integer-named directory is a
whole SavedModel when seen and never changes while visible. Afterwards
`backfill` and `run` must converge with nothing left to do, and then: each
checkpoint is published exactly once, versions follow training order, a gc
with a 1 s lease leaves no staging, and every version loads with TF Serving's
loader and serves what its checkpoint computes.

The seed is random per run and printed; CHAOS_SEED=<n> replays a run's
choices (its kill instants still vary with the machine's timing).
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import make_workspace
from tests.support.chaos import Chaos, ServingWatcher, prepare


def _chaos(tmp_path, trained_dir, kills: int) -> tuple[Chaos, ServingWatcher, list[str]]:
    ws = make_workspace(tmp_path, trained_dir)
    ws.train_more(30)  # ckpt-40, ckpt-50, ckpt-60: six checkpoints, so backfill has work
    config = prepare(ws.root, ws.train)
    seed = int(os.environ["CHAOS_SEED"]) if os.environ.get("CHAOS_SEED") else None
    chaos = Chaos(ws.root, config, ws.base, ws.train, seed=seed, log=print)
    print(f"chaos seed {chaos.seed}; logs in {chaos.logdir}")
    with ServingWatcher(ws.base) as watcher:
        chaos.calibrate()
        chaos.run_chaos(kills=kills)
        chaos.converge()
        chaos.final_gc()
    problems = chaos.verify(watcher)
    print(chaos.table(watcher, problems))
    if not chaos.hosts_ok:
        print(f"retries from another host skipped: {chaos.hosts_reason}")
    return chaos, watcher, problems


def _assert_chaos_held(chaos: Chaos, watcher: ServingWatcher, problems: list[str], kills: int) -> None:
    assert chaos.kills >= kills, f"only {chaos.kills} of {kills} kills landed (seed {chaos.seed})"
    assert watcher.polls > 1000 and watcher.sightings >= 6
    assert not problems, f"seed {chaos.seed}:\n" + chaos.table(watcher, problems)


@pytest.mark.alone
def test_chaos_short(tmp_path, trained_dir):
    """About 8 kills: under four minutes on two cores."""
    chaos, watcher, problems = _chaos(tmp_path, trained_dir, kills=8)
    _assert_chaos_held(chaos, watcher, problems, kills=8)


@pytest.mark.long
@pytest.mark.timeout(3600)
def test_chaos_long(tmp_path, trained_dir):
    chaos, watcher, problems = _chaos(tmp_path, trained_dir, kills=40)
    _assert_chaos_held(chaos, watcher, problems, kills=40)
