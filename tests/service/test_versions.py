"""Model identity, several versions side by side, live reload and the lifecycle chain (issue 9).

Two "versions" of one architecture are copies of a cached test pair under two folder names, the second with
its manifest changed (a release field), which changes its version digest and nothing that is verified.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import sqlalchemy as sa

from core.identity import version_digest
from core.manifest import SEAL_KEY, read_manifest, write_manifest
from service.app.registry import ModelRegistry
from service.audit import chain, lifecycle
from service.audit.lifecycle import ModelEvent
from tests.api_fixtures import chest_like, headers, make_settings, png_bytes, started, upload
from tests.db_fixtures import make_entry

OLD, NEW = "densenet201-2026-11", "densenet201-2026-12"


def _set_release(folder: Path, release: str) -> None:
    """Change the manifest (not a verified file) and re-seal it, as a release would: a new version digest
    for the same weights."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["release"] = release
    write_manifest(folder, {k: v for k, v in manifest.items() if k != SEAL_KEY})


def two_versions(source: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source / "densenet201", dest / OLD)
    shutil.copytree(source / "densenet201", dest / NEW)
    _set_release(dest / NEW, "2026-12")
    shutil.copytree(source / "resnet50v2", dest / "resnet50v2")
    return dest


def predict(app: Any, **form: str) -> httpx.Response:
    response: httpx.Response = app.post(
        "/predict", files=upload(png_bytes(chest_like(96, seed=3))), data=form, headers=headers("predict")
    )
    return response


# ------------------------------------------------------------------------------------------ the digest


def test_version_digest_covers_files_and_manifest_not_the_folder_name(
    api_artifacts: Path, tmp_path: Path
) -> None:
    manifest = read_manifest(api_artifacts / "densenet201")
    digest = version_digest(manifest)
    assert len(digest) == 64 and digest == version_digest(json.loads(json.dumps(manifest)))
    copy = two_versions(api_artifacts, tmp_path / "a")
    assert version_digest(read_manifest(copy / OLD)) == digest  # same content, other name: same version
    assert version_digest(read_manifest(copy / NEW)) != digest
    changed_file = {**manifest, "files": {**manifest["files"], "transfer.onnx": "0" * 64}}
    assert version_digest(changed_file) != digest
    calibrated = {**manifest, "drift_calibration": {"layercam": {"threshold": 0.5}}}
    recalibrated = {**manifest, "drift_calibration": {"layercam": {"threshold": 0.6}}}
    assert len({digest, version_digest(calibrated), version_digest(recalibrated)}) == 3


# ------------------------------------------------------------------------------------------ side by side


def test_two_versions_of_one_architecture_are_served_and_audited_apart(
    api_artifacts: Path, tmp_path: Path, db_url: str
) -> None:
    artifacts = two_versions(api_artifacts, tmp_path / "artifacts")
    digests = {name: version_digest(read_manifest(artifacts / name)) for name in (OLD, NEW, "resnet50v2")}
    with started(make_settings(artifacts, db_url)) as app:
        assert app.get("/readyz").status_code == 200
        models = app.get("/models", headers=headers("audit")).json()
        served = {m["name"]: m for m in models["ready"]}
        assert {name: m["digest"] for name, m in served.items()} == digests
        assert served[NEW]["default_version"] and not served[OLD]["default_version"]
        assert served[OLD]["architecture"] == served[NEW]["architecture"] == "densenet201"
        assert models["default_models"] == sorted(digests)

        both = predict(app, models=f"{OLD},{NEW}", methods="layercam")
        assert both.status_code == 200, both.text
        results = both.json()["results"]
        assert [(r["model"], r["architecture"], r["model_digest"]) for r in results] == [
            (OLD, "densenet201", digests[OLD]),
            (NEW, "densenet201", digests[NEW]),
        ]
        # same weights: the two versions answer alike; only their identity differs
        assert results[0]["methods"]["layercam"]["drift_score"] == pytest.approx(
            results[1]["methods"]["layercam"]["drift_score"]
        )
        by_arch = predict(app, models="densenet201", methods="layercam")  # the default version
        assert [r["model"] for r in by_arch.json()["results"]] == [NEW]
        unknown = predict(app, models="vgg16")
        assert unknown.status_code == 422 and "densenet201" in unknown.json()["error"]["details"]["valid"]

        audit = headers("audit")
        records = app.get("/audit/records", params={"limit": 100}, headers=audit).json()["items"]
        assert len(records) == 2
        rows = [(d["model"], d["model_architecture"], d["model_digest"]) for r in records for d in r["drift"]]
        assert set(rows) == {(OLD, "densenet201", digests[OLD]), (NEW, "densenet201", digests[NEW])}
        by_digest = app.get("/audit/records", params={"digest": digests[OLD][:12]}, headers=audit).json()
        assert [r["id"] for r in by_digest["items"]] == [both.json()["audit_record_id"]]
        by_architecture = app.get("/audit/records", params={"architecture": "densenet201"}, headers=audit)
        assert len(by_architecture.json()["items"]) == 2
        assert (
            app.get("/audit/records", params={"architecture": "resnet50v2"}, headers=audit).json()["items"]
            == []
        )
        assert app.get("/audit/records", params={"digest": "xyz"}, headers=audit).status_code == 422

        summary = app.get("/audit/summary", params={"group_by": "digest"}, headers=audit).json()["summary"]
        assert {g["key"]["digest"]: g["count"] for g in summary["groups"]} == {
            digests[OLD]: 1,
            digests[NEW]: 2,
        }
        grouped = app.get("/audit/summary", params={"group_by": "architecture,model"}, headers=audit).json()
        keys = [(g["key"]["architecture"], g["key"]["model"]) for g in grouped["summary"]["groups"]]
        assert keys == [("densenet201", OLD), ("densenet201", NEW)]

        compared = app.get("/audit/summary", params={"compare": f"{OLD},{NEW}"}, headers=audit)
        comparison = compared.json()["summary"]["comparison"]
        assert comparison["architecture"] == "densenet201" and comparison["b"]["digests"] == [digests[NEW]]
        assert comparison["methods"]["layercam"]["b"]["n"] == 2  # too few for a test: said, not guessed
        assert comparison["methods"]["layercam"]["significant"] is False
        mixed = app.get("/audit/summary", params={"compare": f"{OLD},resnet50v2"}, headers=audit)
        assert mixed.status_code == 200  # resnet50v2 has no rows here: one architecture
        assert app.get("/audit/summary", params={"compare": OLD}, headers=audit).status_code == 422

        text = app.get("/audit/records.csv", params={"model": NEW}, headers=audit).text
        lines = list(csv.DictReader(io.StringIO(text)))
        assert {(row["model"], row["model_architecture"], row["model_digest"]) for row in lines} == {
            (NEW, "densenet201", digests[NEW])
        }
        verified = app.get("/audit/verify", headers=audit).json()
        assert verified["ok"] and verified["checked"] == 2 and verified["model_events"]["checked"] == 3


def test_default_models_and_strictness_are_settings(
    api_artifacts: Path, tmp_path: Path, sqlite_url: str
) -> None:
    artifacts = two_versions(api_artifacts, tmp_path / "artifacts")
    (artifacts / "broken").mkdir()
    (artifacts / "broken" / "manifest.json").write_text("{not json")
    settings = make_settings(
        artifacts, sqlite_url, default_models=["densenet201", "vgg16"], strict_models=False
    )
    with started(settings) as app:
        ready = app.get("/readyz")
        assert ready.status_code == 200 and ready.json()["strict"] is False
        assert [f["name"] for f in ready.json()["models_failed"]] == ["broken"]
        models = app.get("/models", headers=headers("audit")).json()
        assert models["default_models"] == [NEW] and models["not_ready"][0]["name"] == "broken"
        answer = predict(app, methods="layercam")
        assert [r["model"] for r in answer.json()["results"]] == [NEW]
    with started(make_settings(artifacts, sqlite_url)) as app:  # strict (the default)
        ready = app.get("/readyz")
        assert ready.status_code == 503 and "broken" in ready.json()["error"]["message"]


# ------------------------------------------------------------------------------------------ live reload


def test_reload_under_load_loses_no_request_and_records_name_the_version(
    api_artifacts: Path, tmp_path: Path, db_url: str
) -> None:
    artifacts = tmp_path / "artifacts"
    shutil.copytree(api_artifacts / "resnet50v2", artifacts / "resnet50v2")
    old = version_digest(read_manifest(artifacts / "resnet50v2"))
    with started(make_settings(artifacts, db_url)) as app:
        registry: ModelRegistry = app.app.state.cxr.registry
        old_served = registry.snapshot.served["resnet50v2"]
        retired: list[str] = []
        registry.add_retire_hook(lambda served: retired.append(served.identity.digest))
        _set_release(artifacts / "resnet50v2", "v2")
        new = version_digest(read_manifest(artifacts / "resnet50v2"))
        shutil.copytree(api_artifacts / "densenet201", artifacts / "densenet201")

        async def traffic() -> tuple[list[httpx.Response], httpx.Response]:
            async def one(i: int) -> httpx.Response:
                await asyncio.sleep(0.02 * i)
                return await app.client.post(
                    "/predict",
                    files=upload(png_bytes(chest_like(64, seed=i))),
                    data={"models": "resnet50v2", "methods": "layercam"},
                    headers=headers("predict"),
                )

            async def reload() -> httpx.Response:
                await asyncio.sleep(0.05)
                return await app.client.post(
                    "/admin/models/reload", json={"reason": "release v2"}, headers=headers("admin")
                )

            *answers, reloaded = await asyncio.gather(*[one(i) for i in range(12)], reload())
            return answers, reloaded

        answers, reloaded = app.run(traffic())
        assert reloaded.status_code == 200, reloaded.text
        body = reloaded.json()
        assert (
            body["replaced"] == ["resnet50v2"] and body["loaded"] == ["densenet201"] and body["retired"] == []
        )
        assert [a.status_code for a in answers] == [200] * 12
        answered = {a.json()["audit_record_id"]: a.json()["results"][0]["model_digest"] for a in answers}
        assert set(answered.values()) <= {old, new}
        after = predict(app, models="resnet50v2", methods="layercam")
        assert after.json()["results"][0]["model_digest"] == new
        # the old version was closed once no request used it, after its retire hooks ran
        assert old_served.usage.closed and retired == [old]

        # every record names the version that answered it
        engine = app.app.state.cxr.engine
        with engine.connect() as connection:
            stored = dict(
                connection.execute(sa.text("SELECT record_id, model_digest FROM audit_drift")).all()
            )
        assert {k: v for k, v in stored.items() if k in answered} == answered
        assert len(stored) == 13

        # the lifecycle: the load at start, then the reload's load and replace (folder order), by the admin key
        events = app.get("/audit/model-events", headers=headers("audit")).json()["items"]
        assert [(e["event"], e["model"]) for e in reversed(events)] == [
            ("load", "resnet50v2"),
            ("load", "densenet201"),
            ("replace", "resnet50v2"),
        ]
        replace = events[0]
        assert replace["previous_digest"] == old and replace["model_digest"] == new
        assert replace["api_key_name"] == "admin-user" and replace["reason"] == "release v2"
        models = {m["name"]: m for m in app.get("/models", headers=headers("audit")).json()["ready"]}
        assert (
            models["resnet50v2"]["digest"] == new and models["resnet50v2"]["since"] == replace["created_at"]
        )

        # retire: the folder goes away
        shutil.rmtree(artifacts / "densenet201")
        retired_body = app.post("/admin/models/reload", headers=headers("admin")).json()
        assert retired_body["retired"] == ["densenet201"] and retired_body["unchanged"] == ["resnet50v2"]
        assert predict(app, models="densenet201").status_code == 422
        verified = app.get("/audit/verify", headers=headers("audit")).json()
        assert verified["ok"] and verified["model_events"]["checked"] == 4
        assert app.post("/admin/models/reload", headers=headers("audit")).status_code == 403


def test_a_failed_replacement_keeps_the_serving_version(
    api_artifacts: Path, tmp_path: Path, sqlite_url: str
) -> None:
    artifacts = tmp_path / "artifacts"
    shutil.copytree(api_artifacts / "resnet50v2", artifacts / "resnet50v2")
    old = version_digest(read_manifest(artifacts / "resnet50v2"))
    with started(make_settings(artifacts, sqlite_url)) as app:
        _set_release(artifacts / "resnet50v2", "v2")
        (artifacts / "resnet50v2" / "finetuned.onnx").write_bytes(b"not the exported graph")
        body = app.post("/admin/models/reload", headers=headers("admin")).json()
        assert body["replaced"] == [] and body["failed"][0]["name"] == "resnet50v2"
        assert "finetuned.onnx" in body["failed"][0]["reason"]
        answer = predict(app, methods="layercam")
        assert answer.status_code == 200 and answer.json()["results"][0]["model_digest"] == old
        assert app.get("/readyz").status_code == 503  # strict: the failed folder is reported


# ------------------------------------------------------------------------------------------ the chain


def _event(kind: str, model: str = "m", digest: str = "a" * 64, **extra: Any) -> ModelEvent:
    return ModelEvent(event=kind, model=model, model_architecture="densenet201", model_digest=digest, **extra)


def test_lifecycle_records_verify_and_tampering_is_detected(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(0)
    first = lifecycle.append_event(db_engine, _event("load", api_key_name=None, reason="service start"))
    record = chain.append(db_engine, make_entry(rng))
    second = lifecycle.append_event(
        db_engine,
        _event("replace", digest="b" * 64, previous_digest="a" * 64, api_key_name="ops", reason="v2"),
    )
    chain.append(db_engine, make_entry(rng))
    third = lifecycle.append_event(db_engine, _event("retire", digest="b" * 64, api_key_name="ops"))
    assert second.prev_hash == first.row_hash and third.prev_hash == second.row_hash
    result = lifecycle.verify_events(db_engine)
    assert (
        result.ok
        and result.checked == 3
        and result.head_id == third.id
        and result.head_hash == third.row_hash
    )
    events = lifecycle.list_events(db_engine)
    assert [e["event"] for e in events] == ["retire", "replace", "load"]
    assert events[1]["records_head_id"] == record.id and events[1]["records_head_hash"] == record.row_hash
    assert events[2]["records_head_id"] is None

    with pytest.raises(sa.exc.DBAPIError), db_engine.begin() as connection:  # append-only in the database
        connection.exec_driver_sql("UPDATE audit_model_events SET reason = 'x'")
    _disable_triggers(db_engine)
    with db_engine.begin() as connection:
        connection.exec_driver_sql(f"UPDATE audit_model_events SET reason = 'v3' WHERE id = {second.id}")
    bad = lifecycle.verify_events(db_engine)
    assert not bad.ok and bad.first_bad_id == second.id and "content hash mismatch" in str(bad.reason)
    assert bad.checked == 1 and bad.head_id == first.id


def test_deleted_event_and_a_moved_anchor_are_detected(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(1)
    chain.append(db_engine, make_entry(rng))
    first = lifecycle.append_event(db_engine, _event("load"))
    second = lifecycle.append_event(db_engine, _event("retire"))
    third = lifecycle.append_event(db_engine, _event("load", model="n"))
    _disable_triggers(db_engine)
    with db_engine.begin() as connection:
        connection.exec_driver_sql(f"DELETE FROM audit_model_events WHERE id = {second.id}")
    bad = lifecycle.verify_events(db_engine)
    assert not bad.ok and bad.first_bad_id == third.id and "broken link" in str(bad.reason)
    # an event whose anchor record no longer has the recorded hash (the records' chain rewritten under it)
    with db_engine.begin() as connection:
        connection.exec_driver_sql(f"DELETE FROM audit_model_events WHERE id = {third.id}")
        connection.exec_driver_sql("UPDATE audit_records SET row_hash = '" + "f" * 64 + "'")
    moved = lifecycle.verify_events(db_engine)
    assert not moved.ok and moved.first_bad_id == first.id and "anchor mismatch" in str(moved.reason)


def test_a_reload_that_cannot_be_recorded_changes_nothing(api_artifacts: Path, tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    shutil.copytree(api_artifacts / "resnet50v2", artifacts / "resnet50v2")
    calls: list[ModelEvent] = []
    fail = threading.Event()

    def record(event: ModelEvent) -> int:
        if fail.is_set():
            raise RuntimeError("database down")
        calls.append(event)
        return len(calls)

    registry = ModelRegistry(artifacts, ort_threads=1, record=record)
    assert registry.reload().loaded == ["resnet50v2"]
    before = registry.snapshot
    shutil.copytree(api_artifacts / "densenet201", artifacts / "densenet201")
    fail.set()
    with pytest.raises(RuntimeError, match="database down"):
        registry.reload(actor="ops")
    assert registry.snapshot is before and [e.event for e in calls] == ["load"]
    fail.clear()
    report = registry.reload(actor="ops")
    assert report.loaded == ["densenet201"] and report.event_ids == [2]
    registry.close()


def _disable_triggers(engine: sa.Engine) -> None:
    with engine.begin() as connection:
        for table in ("audit_records", "audit_drift", "audit_model_events"):
            if engine.dialect.name == "sqlite":
                for operation in ("update", "delete"):
                    connection.exec_driver_sql(f"DROP TRIGGER IF EXISTS {table}_append_only_{operation}")
            else:
                connection.exec_driver_sql(f"ALTER TABLE {table} DISABLE TRIGGER USER")


def test_a_replaced_pair_stays_open_until_its_last_request_ends(api_artifacts: Path, tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    shutil.copytree(api_artifacts / "resnet50v2", artifacts / "resnet50v2")
    events: list[ModelEvent] = []

    def record(event: ModelEvent) -> int:
        events.append(event)
        return len(events)

    registry = ModelRegistry(artifacts, ort_threads=1, record=record)
    loaded: list[str] = []
    registry.add_load_hook(lambda served: loaded.append(served.identity.digest))
    registry.reload()
    batch = np.zeros((1, 3, 96, 96), dtype=np.float32)
    with registry.use() as held:
        old = held.served["resnet50v2"]
        _set_release(artifacts / "resnet50v2", "v2")
        assert registry.reload(actor="ops", reason="v2").replaced == ["resnet50v2"]
        assert registry.snapshot.served["resnet50v2"].identity.digest != old.identity.digest
        assert not old.usage.closed  # this request still computes with it
        assert set(old.pair.forward(batch)) == {"transfer", "finetuned"}
    assert old.usage.closed
    assert [e.event for e in events] == ["load", "replace"] and events[
        1
    ].previous_digest == old.identity.digest
    assert loaded == [old.identity.digest, registry.snapshot.served["resnet50v2"].identity.digest]
    registry.close()
    assert registry.snapshot.served == {}
