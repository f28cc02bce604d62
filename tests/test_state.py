"""The shared serving state on SQLite and on a real PostgreSQL: label sets, prediction records,
expiry, concurrent migrations, and an unreachable store reported as such."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from labelmatch.core.errors import ConfigError
from labelmatch.state.migrations import migrate
from labelmatch.state.replica import ReplicaState, StateConfig, text_sha256
from labelmatch.state.serving_state import (
    MIGRATIONS,
    VERSION_TABLE,
    PredictionRecord,
    ServingState,
    StateUnavailable,
)

THRESHOLDS = {"default": 0.5, "labels": {"vat": 0.4}}


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return request.getfixturevalue("postgres_url")


def test_label_sets_are_versioned_per_model_version(url):
    state = ServingState(url)
    assert state.latest_label_set("m1") is None and state.latest_version("m1") == 0
    first = state.save_label_set("m1", {"vat": "Value added tax."}, THRESHOLDS)
    other = state.save_label_set("m2", {"payroll": "Payroll taxes."}, {"default": 0.5, "labels": {}})
    second = state.save_label_set("m1", {"vat": "VAT.", "customs": "Import duties."}, THRESHOLDS)
    assert first.version < other.version < second.version
    latest = ServingState(url).latest_label_set("m1")  # a second replica, a fresh engine
    assert latest.version == second.version and latest.labels == {"vat": "VAT.", "customs": "Import duties."}
    assert latest.thresholds == THRESHOLDS
    assert ServingState(url).latest_version("m2") == other.version


def test_prediction_records_resolve_until_they_expire(url):
    state = ServingState(url, prediction_ttl_s=1.0)
    record = PredictionRecord("p1", "m1", 3, ["vat"], {"vat": 0.9, "payroll": 0.1}, text_sha256("VAT due"),
                              "VAT due")
    state.record_predictions([record, PredictionRecord("p2", "m1", 3, [], {}, text_sha256("x"))])
    found = ServingState(url).prediction("p1")
    assert found is not None and found.text == "VAT due"
    assert (found.labels, found.scores) == (["vat"], record.scores)
    assert found.label_set_version == 3 and found.expires_at - found.created_at == pytest.approx(1.0)
    assert ServingState(url).prediction("p2").text is None
    assert state.prediction("unknown") is None
    time.sleep(1.2)
    assert state.prediction("p1") is None, "an expired id no longer resolves"
    assert state.purge_expired() == 2


def test_a_delivery_decision_is_stored_only_while_the_event_it_answers_is_the_newest(url):
    """``newest_id``: one statement inserts the decision only if no later event of the service was
    stored (the canary reaper's answer to a started canary must not hide a newer deploy's)."""
    state = ServingState(url)
    first = state.save_delivery_event("tax", "r1", "canary", "started", {"deadline": 1.0})
    state.save_delivery_event("other", "o1", "canary", "started", {})  # another service's: no matter
    decided = state.save_delivery_event("tax", "r1", "canary", "rolled_back", {"reason": "abandoned"},
                                        newest_id=first)
    assert decided > first
    newer = ServingState(url).save_delivery_event("tax", "r2", "canary", "started", {"deadline": 2.0})
    assert state.save_delivery_event("tax", "r1", "canary", "superseded", {}, newest_id=decided) == 0
    newest_id, newest = state.latest_delivery_event("tax")
    assert (newest_id, newest["release_id"], newest["decision"]) == (newer, "r2", "started")
    assert newest["deadline"] == 2.0
    assert isinstance(newest["created_at"], float)


def test_a_database_newer_than_the_code_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    state = ServingState(url)
    with state.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE serving_schema_version SET version = 99")
    with pytest.raises(ConfigError, match="schema version 99 is newer"):
        ServingState(url)


def _open(url: str, queue) -> None:
    try:
        ServingState(url)
        queue.put("ok")
    except Exception as exc:  # reported to the parent
        queue.put(repr(exc))


def test_replicas_opening_an_empty_postgres_database_at_once_migrate_it_once(postgres_url):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    processes = [ctx.Process(target=_open, args=(postgres_url, queue)) for _ in range(4)]
    for p in processes:
        p.start()
    results = [queue.get(timeout=120) for _ in processes]
    for p in processes:
        p.join(timeout=30)
    assert results == ["ok"] * 4
    with ServingState(postgres_url).engine.connect() as conn:
        versions = conn.exec_driver_sql("SELECT version FROM serving_schema_version").scalars().all()
    assert versions == [len(MIGRATIONS)]


def test_a_replica_picks_up_another_replicas_label_set_and_reports_an_unreachable_store(url):
    applied = []
    one = ReplicaState(StateConfig(url, label_sync_s=0.1), "m1", applied.append)
    two = ReplicaState(StateConfig(url, label_sync_s=0.1), "m1", lambda label_set: None)
    two.save_labels({"vat": "Value added tax."}, THRESHOLDS)
    one.start()
    try:
        deadline = time.monotonic() + 5
        while not applied and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [s.version for s in applied] == [two.label_set_version] and one.label_set_version == 1
        assert one.error is None
    finally:
        one.stop()
        two.stop()


def test_a_pinned_label_set_is_served_until_a_newer_one_is_stored(url):
    """A rollback pins the label set its release served; older and newer-but-existing sets do not
    replace it, one stored afterwards does, and a set of another model cannot be pinned."""
    admin = ReplicaState(StateConfig(url), "m1", lambda label_set: None)
    first = admin.save_labels({"vat": "Value added tax."}, THRESHOLDS)
    admin.save_labels({"vat": "VAT.", "customs": "Import duties."}, THRESHOLDS)
    other = ServingState(url).save_label_set("m2", {"payroll": "Payroll."}, THRESHOLDS)
    applied = []
    replica = ReplicaState(StateConfig(url), "m1", applied.append)
    replica.pin_labels(first.version)
    assert [s.labels for s in applied] == [{"vat": "Value added tax."}]
    assert replica.label_set_version == first.version
    assert not replica.sync_labels()
    model_own = ReplicaState(StateConfig(url), "m1", applied.append)
    model_own.pin_labels(0)
    assert not model_own.sync_labels() and model_own.label_set_version == 0
    later = admin.save_labels({"customs": "Import duties."}, THRESHOLDS)
    assert replica.sync_labels() and replica.label_set_version == later.version
    with pytest.raises(ConfigError, match=rf"label set version {other.version} .*no such label set for model "
                                          r"version m1"):
        ReplicaState(StateConfig(url), "m1", applied.append).pin_labels(other.version)


def test_a_replica_that_cannot_reach_its_store_at_start_fails_with_the_reason():
    # A port nothing listens on: the server must not start half-configured.
    replica_config = StateConfig("postgresql+psycopg://nobody@127.0.0.1:9/none")
    with pytest.raises(StateUnavailable, match=r"cannot migrate"):
        ReplicaState(replica_config, "m1", lambda label_set: None)


def test_state_settings_are_checked():
    with pytest.raises(ConfigError, match="prediction_text"):
        StateConfig("sqlite://", prediction_text="plain")
    with pytest.raises(ConfigError, match="label_sync_s"):
        StateConfig("sqlite://", label_sync_s=0)


def test_prediction_records_are_written_behind_the_response_and_resolve_on_another_replica(url):
    written: list[float] = []
    one = ReplicaState(StateConfig(url, record_delay_s=0.2), "m1", lambda s: None, on_written=written.append)
    two = ReplicaState(StateConfig(url, record_delay_s=0.2), "m1", lambda s: None)
    one.record(["a1", "a2"], ["VAT due for Q3", "Payroll"],
               [{"labels": ["vat"], "scores": {"vat": 0.9}}, {"labels": [], "scores": {"vat": 0.1}}], 0)
    assert one.store.prediction("a1") is None, "queued, not yet written"
    one.flush()
    assert len(written) == 1, "one transaction for the batch"
    found = two.resolve("a1")
    assert found is not None and found.labels == ["vat"] and found.text == "VAT due for Q3"
    start = time.monotonic()
    assert two.resolve("never-made") is None
    assert 0.2 <= time.monotonic() - start < 2, "an unknown id waits record_delay_s for a record in flight"


def test_a_version_1_state_upgrades_in_place_keeping_its_label_sets(tmp_path):
    """A database written by the release before the prediction log (schema 1) is migrated on open."""
    from sqlalchemy import create_engine, text

    url = f"sqlite:///{tmp_path / 'v1.db'}"
    engine = create_engine(url)
    assert migrate(engine, VERSION_TABLE, MIGRATIONS[:1], "v1") == 1
    with engine.begin() as conn:  # what the schema-1 release wrote
        conn.execute(text("INSERT INTO label_sets (model_version, labels, thresholds, created_at) "
                          "VALUES ('m1', '{\"vat\": \"Value added tax.\"}', '{\"default\": 0.5}', 1.0)"))
    engine.dispose()
    state = ServingState(url)
    assert state.latest_label_set("m1").labels == {"vat": "Value added tax."}
    with state.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version FROM serving_schema_version").scalar() == len(MIGRATIONS)
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM prediction_log").scalar() == 0
