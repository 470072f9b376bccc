"""Fast checks of the pieces: config, state-file parsing, claims, retention arithmetic."""

from __future__ import annotations

import json
import os

import pytest

from tf_export_pipeline.checkpoints import Checkpoint, discover_checkpoints
from tf_export_pipeline.checkpoints.tf_checkpoints import parse_state_file
from tf_export_pipeline.config import config_from_dict, load_config
from tf_export_pipeline.errors import ConfigError, PublishError
from tf_export_pipeline.publish import Publisher, first_candidate
from tf_export_pipeline.retention import versions_to_remove
from tf_export_pipeline.storage import open_storage

BASE = {"training_dir": "./train", "export_base": "./serving/m", "model": {"factory": "pkg.mod:build"}}


def test_relative_paths_are_taken_from_the_config_folder(tmp_path):
    path = tmp_path / "conf" / "c.yaml"
    path.parent.mkdir()
    path.write_text(json.dumps(BASE))
    cfg = load_config(str(path))
    assert cfg.training_dir == str(tmp_path / "conf" / "train")
    assert cfg.export_base == str(tmp_path / "conf" / "serving" / "m")
    assert cfg.config_dir == str(tmp_path / "conf")
    remote = config_from_dict({**BASE, "export_base": "gs://bucket/models/m"}, str(tmp_path))
    assert remote.export_base == "gs://bucket/models/m"


def test_defaults_are_the_safe_ones(tmp_path):
    cfg = config_from_dict(dict(BASE), str(tmp_path))
    assert cfg.versioning == "timestamp" and cfg.max_claim_attempts == 10
    assert cfg.retention.keep == 5 and cfg.retention.lease_seconds == 86400
    assert cfg.model.checkpoint_key == "model"


def test_config_hash_ignores_versioning_but_not_the_model(tmp_path):
    a = config_from_dict(dict(BASE), str(tmp_path))
    b = config_from_dict({**BASE, "versioning": "checkpoint_time", "retention": {"keep": 2}}, str(tmp_path))
    c = config_from_dict({**BASE, "model": {"factory": "pkg.mod:build", "checkpoint_key": "net"}}, str(tmp_path))
    assert a.config_hash == b.config_hash != c.config_hash


def test_config_rejects_zero_keep(tmp_path):
    with pytest.raises(ConfigError, match="retention.keep"):
        config_from_dict({**BASE, "retention": {"keep": 0}}, str(tmp_path))


def test_state_file_parsing():
    text = '''model_checkpoint_path: "ckpt-30"
all_model_checkpoint_paths: "ckpt-20"
all_model_checkpoint_paths: "/abs/dir/ckpt-30"
all_model_checkpoint_timestamps: 100.5
all_model_checkpoint_timestamps: 200.25
last_preserved_timestamp: 1.0
'''
    paths, times = parse_state_file(text)
    assert paths == ["ckpt-20", "/abs/dir/ckpt-30", "ckpt-30"]
    assert times == {"ckpt-20": 100.5, "/abs/dir/ckpt-30": 200.25}


def _fake_ckpt(d, name, shards=1, skip=()):
    (d / f"{name}.index").write_bytes(name.encode())
    for k in range(shards):
        if k not in skip:
            (d / f"{name}.data-{k:05d}-of-{shards:05d}").write_bytes(b"x")


def test_discovery_finds_unlisted_checkpoints_and_checks_every_shard(tmp_path):
    _fake_ckpt(tmp_path, "ckpt-5")
    _fake_ckpt(tmp_path, "ckpt-100", shards=3)
    _fake_ckpt(tmp_path, "ckpt-20", shards=2, skip=(1,))
    (tmp_path / "ckpt-7.data-00000-of-00001").write_bytes(b"being written")
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "ckpt-100"\nall_model_checkpoint_paths: "ckpt-100"\n')
    found = discover_checkpoints(open_storage(str(tmp_path)))
    assert [c.name for c in found] == ["ckpt-5", "ckpt-7", "ckpt-20", "ckpt-100"]
    by = {c.name: c for c in found}
    assert by["ckpt-5"].complete and by["ckpt-100"].complete and by["ckpt-100"].listed
    assert not by["ckpt-20"].complete and by["ckpt-20"].missing == ["ckpt-20.data-00001-of-00002"]
    assert not by["ckpt-7"].complete and by["ckpt-7"].missing == ["ckpt-7.index"]
    # identity follows the index bytes
    key = by["ckpt-5"].ledger_key("h")
    (tmp_path / "ckpt-5.index").write_bytes(b"rewritten index")
    again = {c.name: c for c in discover_checkpoints(open_storage(str(tmp_path)))}
    assert again["ckpt-5"].ledger_key("h") != key
    assert again["ckpt-5"].ledger_key("h") != again["ckpt-5"].ledger_key("other-config")


def test_create_only_is_exclusive(tmp_path):
    store = open_storage(str(tmp_path))
    target = str(tmp_path / "_exports" / "claims" / "7")
    assert store.create_only(target, b"first") is True
    assert store.create_only(target, b"second") is False
    assert (tmp_path / "_exports" / "claims" / "7").read_bytes() == b"first"


def test_claim_skips_numbers_the_listing_shows_taken(tmp_path):
    pub = Publisher(open_storage(str(tmp_path)))
    for v in (100, 101):
        assert pub.store.create_only(pub.claim_path(v), b"other writer")
    (tmp_path / "102").mkdir()  # a version published without a claim (e.g. by the seed exporter)
    version, attempts = pub.claim(100, 10, {"who": "me"})
    assert (version, attempts) == (103, 1)
    assert json.loads((tmp_path / "_exports" / "claims" / "103").read_text()) == {"who": "me"}
    # twenty checkpoints written within one second get twenty consecutive numbers
    got = [pub.claim(200, 2, {"n": i})[0] for i in range(20)]
    assert got == list(range(200, 220))


class _RacedStorage(type(open_storage("/"))):
    """A storage whose create-only writes always lose to another writer: a race no
    real process can be made to lose on demand every time."""

    def create_only(self, path, data, metadata=None):
        super().create_only(path, b"the other writer")
        return False


def test_claim_gives_up_after_the_limit_of_lost_races(tmp_path):
    (tmp_path / "_exports").mkdir()
    (tmp_path / "_exports" / "storage-check.json").write_text('{"ok": true}')  # checked before the races
    pub = Publisher(_RacedStorage(str(tmp_path)))
    with pytest.raises(PublishError, match="could not claim a version number in 3 attempts from 100"):
        pub.claim(100, 3, {"who": "me"})
    assert sorted(p.name for p in (tmp_path / "_exports" / "claims").iterdir()) == ["100", "101", "102"]


def test_first_candidate_per_policy():
    ck = Checkpoint(prefix="/t/ckpt-42", name="ckpt-42", step=42, written_at=1_700_000_000.9, complete=True)
    assert first_candidate("timestamp", ck, now=1_800_000_000.5, live=None) == 1_800_000_000
    assert first_candidate("timestamp", ck, now=1_800_000_000.5, live=1_900_000_000) == 1_900_000_001
    assert first_candidate("checkpoint_time", ck, now=0, live=None) == 1_700_000_000
    assert first_candidate("step", ck, now=0, live=None) == 42


def test_versions_to_remove_never_removes_pinned_or_highest():
    assert versions_to_remove([1, 2, 3, 4, 5], keep=2) == [1, 2, 3]
    assert versions_to_remove([1, 2, 3, 4, 5], keep=2, pinned=[1]) == [2, 3]
    assert versions_to_remove([9], keep=1) == []
    assert versions_to_remove([], keep=3) == []


def test_publisher_lists_only_integer_directories(tmp_path):
    for name in ("10", "9", "temp-1-ab", "_exports", "notes.txt"):
        (tmp_path / name).mkdir() if name != "notes.txt" else (tmp_path / name).write_text("x")
    (tmp_path / "11").write_text("a file named like a version")
    pub = Publisher(open_storage(str(tmp_path)))
    assert pub.versions() == [9, 10] and pub.live_version() == 10
    assert os.path.isdir(tmp_path / "temp-1-ab")
