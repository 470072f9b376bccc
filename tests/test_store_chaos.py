"""Random SIGKILLs on S3 and Azure Blob, retries from another host, then convergence to each checkpoint once.

Per store: one uninterrupted ``run`` gives the time a run takes; then six
commands (``run`` and ``backfill`` in turn, the training job writing a newer
checkpoint before each) are SIGKILLed, with every process of their session,
at an instant drawn between 15 % and 80 % of that time (export,
validation, claim, ledger entry and object-by-object promotion all get hit).
Then ``backfill`` and ``run`` go again from another hostname. Every checkpoint
must then have exactly one version, whole on the store, versions in training
order, nothing left pending, no committed publish left unpromoted. The seed is
printed; CHAOS_SEED=<n> replays its choices.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time

import pytest

from tests.conftest import cli_popen, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

KILLS = 6


def _store(store: str, request, tmp_path, trained_dir):
    """(config path, export base URL, storage options, upload(local train dir)) on the store named."""
    from tf_export_pipeline.demo import write_config

    if store == "s3":
        from tests.test_s3_store import BASE, upload_tree

        place = request.getfixturevalue("s3_bucket")
    else:
        from tests.test_azure_store import BASE, upload_tree

        place = request.getfixturevalue("azure_container")
    options = dict(place.storage_options)
    config = write_config(str(tmp_path), training_dir=place.url("train"), export_base=place.url(BASE),
                          storage_options=options, retention={"keep": 100})
    return config, place.url(BASE), options, lambda local: upload_tree(place, local, "train")


def _run_and_kill(args: tuple[str, ...], config: str, delay: float) -> tuple[bool, int | None, str]:
    proc = cli_popen(*args, "--json", "--config", config, start_new_session=True)
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    if proc.poll() is not None:
        out, err = proc.communicate()
        return False, proc.returncode, err
    os.killpg(proc.pid, signal.SIGKILL)  # the command and its validation process
    proc.wait(30)
    return True, None, ""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for retries from another hostname (unshare -u)")
@pytest.mark.parametrize("store", ["s3", "az"])
def test_random_kills_then_retries_from_another_host_converge_to_each_checkpoint_once(store, request, tmp_path,
                                                                                       trained_dir):
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.demo import train
    from tf_export_pipeline.publish import Publisher
    from tf_export_pipeline.stages import list_pending
    from tf_export_pipeline.storage import open_storage

    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(10**6))
    rng = random.Random(seed)
    print(f"chaos seed {seed} ({store})")
    config, base_url, options, upload = _store(store, request, tmp_path, trained_dir)
    local = tmp_path / "train"
    shutil.copytree(trained_dir, local)
    upload(local)

    first = run_cli("run", "--json", "--config", config, timeout=300)
    assert first.rc == 0 and first.json["status"] == "published", first.err
    # The window of the kills is that of a run like the ones killed: of one new checkpoint, after the first
    # run checked the store and warmed its caches (the first is slower).
    train(str(local), steps=10, checkpoint_every=10, max_to_keep=None)
    upload(local)
    t0 = time.monotonic()
    second = run_cli("run", "--json", "--config", config, timeout=300)
    took = time.monotonic() - t0
    assert second.rc == 0 and second.json["status"] == "published", second.err
    plan = []
    for i in range(KILLS):
        train(str(local), steps=10, checkpoint_every=10, max_to_keep=None)  # the training job goes on
        upload(local)
        command = ("backfill", "run")[i % 2]
        # A backfill exports the one new checkpoint, and any a kill left.
        delay = round(rng.uniform(0.1 * took, 0.9 * took), 2)
        killed, rc, err = _run_and_kill((command,), config, delay)
        plan.append((command, delay, "killed" if killed else f"rc {rc}"))
        assert killed or rc == 0, (command, rc, err)
    print(f"uninterrupted run {took:.1f} s; {plan}")
    assert sum(p[2] == "killed" for p in plan) >= KILLS // 2, plan

    # The operator runs the same commands again, on another host.
    for args in (("backfill",), ("run",)):
        proc = cli_popen(*args, "--json", "--config", config, hostname="retry-host")
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (args, err, plan)

    publisher = Publisher(open_storage(base_url, options))
    newest = 40 + 10 * KILLS  # ckpt-10..30, the timed run's checkpoint, one per kill
    steps = sorted(e["step"] for e in publisher.ledger().values())
    assert steps == list(range(10, newest + 1, 10)), (steps, plan)  # each checkpoint once, none missing
    versions = publisher.versions()
    assert len(versions) == len(steps), (versions, plan)
    assert [v for v in versions if not publisher.is_whole(publisher.version_path(v))] == [], plan
    by_version = [(publisher.manifest(v) or {}).get("checkpoint", {}).get("step") for v in versions]
    assert by_version == sorted(by_version) and by_version[-1] == newest, (by_version, plan)
    assert list_pending(load_config(config)) == [], plan
    assert publisher.finish_committed() == {"finished": [], "forgotten": []}, plan
