"""Maps for review through the real ``POST /predict`` (CXR_DRIFT_KEEP_MAPS): what the audit record keeps per
setting, that the kept maps are the report's maps box-downsampled (an independent block-mean oracle), that the
hash chain covers them, that no image-sized array is stored, and the dashboard's PNG route."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from engine.review_maps import decode_map
from tests.api_fixtures import (
    KEYS,
    ApiClient,
    chest_like,
    headers,
    make_settings,
    png_bytes,
    sqlite_url,
    started,
    upload,
)

MODELS = "resnet50v2,densenet201"
IMAGE_SIZE = 64  # the upload; the pairs' input size is 96: neither may appear as a stored array


@pytest.fixture(scope="module")
def apps(api_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ApiClient]]:
    """One app per setting, each with its own SQLite audit database."""
    clients: dict[str, ApiClient] = {}
    try:
        for keep in ("none", "flagged", "all"):
            folder = tmp_path_factory.mktemp(f"keep-{keep}")
            settings = make_settings(api_artifacts, sqlite_url(folder), keep_maps=keep)
            clients[keep] = started(settings).__enter__()
        yield clients
    finally:
        for client in clients.values():
            client.close()


def _predict(app: ApiClient, seed: int, **data: str) -> dict[str, Any]:
    response = app.post(
        "/predict",
        files=upload(png_bytes(chest_like(IMAGE_SIZE, seed=seed))),
        data={"models": MODELS, "maps": "raw", **data},
        headers=headers("predict"),
    )
    assert response.status_code == 200, response.text
    return response.json()


def _stored_payload(app: ApiClient, record_id: int) -> tuple[str, dict[str, Any]]:
    with app.app.state.cxr.engine.connect() as conn:
        text = conn.execute(
            sa.text("SELECT payload FROM audit_records WHERE id = :id"), {"id": record_id}
        ).scalar_one()
    text = text if isinstance(text, str) else json.dumps(text)
    return text, json.loads(text)


def _block_mean(cam: list[list[float]], grid: int = 16) -> np.ndarray:
    a = np.asarray(cam, dtype=np.float64)
    b = a.shape[0] // grid
    return a.reshape(grid, b, grid, b).mean(axis=(1, 3))


def test_setting_is_validated() -> None:
    with pytest.raises(ValueError, match="keep_maps must be one of none, flagged, all"):
        make_settings(Path("."), "sqlite:///x.db", keep_maps="some")
    assert make_settings(Path("."), "sqlite:///x.db", keep_maps=" ALL ").keep_maps == "all"
    assert make_settings(Path("."), "sqlite:///x.db").keep_maps == "none"


def test_none_keeps_no_maps(apps: dict[str, ApiClient]) -> None:
    answer = _predict(apps["none"], seed=1)
    _, payload = _stored_payload(apps["none"], answer["audit_record_id"])
    assert "maps" not in payload
    record = apps["none"].get(f"/audit/records/{answer['audit_record_id']}", headers=headers("audit")).json()
    assert record["maps"] is None
    # the answer's own maps are unchanged by the setting (maps=none: no maps in the answer either)
    plain = apps["none"].post(
        "/predict",
        files=upload(png_bytes(chest_like(IMAGE_SIZE, seed=1))),
        data={"models": MODELS},
        headers=headers("predict"),
    )
    assert all(r["maps"] is None for r in plain.json()["results"])


def test_all_keeps_the_downsampled_maps_of_every_request(apps: dict[str, ApiClient]) -> None:
    app = apps["all"]
    answer = _predict(app, seed=2)
    text, payload = _stored_payload(app, answer["audit_record_id"])
    section = payload["maps"]
    assert section["keep"] == "all" and section["kept"] is True and section["grid"] == 16
    assert set(section["models"]) == {r["model"] for r in answer["results"]}
    for result in answer["results"]:
        kept = section["models"][result["model"]]
        assert set(kept) == set(result["maps"])
        for method, answered in result["maps"].items():
            by_checkpoint = {c: cam for c, cam in answered.items() if cam is not None}  # null: not drawn
            assert set(kept[method]) == set(by_checkpoint)
            for checkpoint, cam in by_checkpoint.items():
                oracle = _block_mean(cam)  # the answer's (96, 96) map, averaged over 6 x 6 blocks
                decoded = decode_map(kept[method][checkpoint])
                step = (oracle.max() - oracle.min()) / 255
                assert np.abs(decoded - oracle).max() <= step / 2 + 1e-9
    # the /audit API hands the same section out
    record = app.get(f"/audit/records/{answer['audit_record_id']}", headers=headers("audit")).json()
    assert record["maps"] == section
    # a request that asks for no maps in its answer still has them kept
    plain = app.post(
        "/predict",
        files=upload(png_bytes(chest_like(IMAGE_SIZE, seed=3))),
        data={"models": "resnet50v2", "methods": "layercam"},
        headers=headers("predict"),
    ).json()
    assert plain["results"][0]["maps"] is None
    _, payload = _stored_payload(app, plain["audit_record_id"])
    assert set(payload["maps"]["models"]["resnet50v2"]["layercam"]) >= {"transfer", "finetuned"}
    _assert_no_image_sized_array(text)


def _assert_no_image_sized_array(text: str) -> None:
    """No list and no base64 blob in the stored payload as large as the upload (64 x 64) or the input (96)."""
    small = IMAGE_SIZE * IMAGE_SIZE

    def walk(value: Any) -> Iterator[Any]:
        yield value
        if isinstance(value, dict):
            for v in value.values():
                yield from walk(v)
        elif isinstance(value, list):
            for v in value:
                yield from walk(v)

    for value in walk(json.loads(text)):
        if isinstance(value, list):
            assert len(value) < IMAGE_SIZE
        if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9+/]{64,}={0,2}", value):
            assert len(base64.b64decode(value)) < small
    for value in walk(json.loads(text)["maps"]):
        if isinstance(value, dict) and "uint8" in value:
            assert decode_map(value).shape == (16, 16)


# (image seed, target class): the first two are unflagged with the small test pairs, the next ones flagged
# (uncalibrated: the high band on the raw score; seed 2 -> class 1 gives GradCAM++ "high" on resnet50v2)
FLAG_CANDIDATES = [(4, None), (5, None), (2, "1"), (1, "1"), (0, "1")]


def test_flagged_keeps_maps_only_of_flagged_requests(apps: dict[str, ApiClient]) -> None:
    app = apps["flagged"]
    outcomes = set()
    for seed, target in FLAG_CANDIDATES:
        answer = _predict(app, seed=seed, **({"target_class": target} if target else {}))
        flagged = any(m["flagged"] for r in answer["results"] for m in r["methods"].values())
        _, payload = _stored_payload(app, answer["audit_record_id"])
        section = payload["maps"]
        assert section["keep"] == "flagged" and section["kept"] is flagged
        assert bool(section["models"]) is flagged
        if flagged:  # the whole request's maps: every model x method, not only the flagged one
            assert set(section["models"]) == {r["model"] for r in answer["results"]}
            assert all(set(m) == {"layercam", "gradcampp"} for m in section["models"].values())
        outcomes.add(flagged)
        if outcomes == {True, False}:
            break
    assert outcomes == {True, False}, "the candidates should give a flagged and an unflagged request"


def _drop_triggers(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        for name in conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'trigger'").scalars():
            conn.exec_driver_sql(f'DROP TRIGGER "{name}"')


def test_a_changed_map_breaks_the_chain(api_artifacts: Path, tmp_path: Path) -> None:
    with started(make_settings(api_artifacts, sqlite_url(tmp_path), keep_maps="all")) as app:
        ids = [_predict(app, seed=20 + i)["audit_record_id"] for i in range(3)]
        assert app.get("/audit/verify", headers=headers("audit")).json()["ok"] is True
        _, payload = _stored_payload(app, ids[1])
        encoded = payload["maps"]["models"]["resnet50v2"]["layercam"]["finetuned"]
        raw = bytearray(base64.b64decode(encoded["uint8"]))
        raw[100] ^= 0x40  # one cell of one map
        encoded["uint8"] = base64.b64encode(bytes(raw)).decode()
        engine = app.app.state.cxr.engine
        _drop_triggers(engine)
        with engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE audit_records SET payload = :p WHERE id = :id"),
                {"p": json.dumps(payload), "id": ids[1]},
            )
        verify = app.get("/audit/verify", headers=headers("audit")).json()
        assert verify["ok"] is False and verify["first_bad_id"] == ids[1]
        assert "content hash mismatch" in verify["reason"]


def _sign_in(app: ApiClient) -> None:
    app.client.cookies.clear()
    form = app.get("/dashboard/sign-in")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert token is not None
    signed = app.post("/dashboard/sign-in", data={"api_key": KEYS["audit"], "csrf": token.group(1)})
    assert signed.status_code == 303


def test_record_page_shows_the_kept_maps_as_session_only_pngs(apps: dict[str, ApiClient]) -> None:
    app = apps["all"]
    answer = _predict(app, seed=30)
    rid = answer["audit_record_id"]
    url = f"/dashboard/records/{rid}/maps/resnet50v2/layercam/finetuned.png"
    app.client.cookies.clear()
    assert app.get(url).status_code == 401
    assert app.get("/dashboard/maps-legend.png").status_code == 401
    _sign_in(app)
    page = app.get(f"/dashboard/records/{rid}")
    assert page.status_code == 200
    sources = re.findall(r'<img src="(/dashboard/records/[^"]+\.png)"', page.text)
    expected = {
        f"/dashboard/records/{rid}/maps/{r['model']}/{m}/{c}.png"
        for r in answer["results"]
        for m, by in r["maps"].items()
        for c, cam in by.items()
        if cam is not None
    }
    assert set(sources) == expected and url in sources
    assert 'src="/dashboard/maps-legend.png"' in page.text
    response = app.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = Image.open(__import__("io").BytesIO(response.content))
    assert image.format == "PNG" and image.size == (128, 128)
    assert app.get("/dashboard/maps-legend.png").headers["content-type"] == "image/png"
    missing = app.get(f"/dashboard/records/{rid}/maps/resnet50v2/layercam/nothing.png")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert (
        app.get(f"/dashboard/records/{rid + 999}/maps/resnet50v2/layercam/finetuned.png").status_code == 404
    )


def test_record_pages_say_why_no_maps_were_kept(apps: dict[str, ApiClient]) -> None:
    rid = _predict(apps["none"], seed=40)["audit_record_id"]
    _sign_in(apps["none"])
    page = apps["none"].get(f"/dashboard/records/{rid}")
    assert "Maps were not kept: CXR_DRIFT_KEEP_MAPS=none at the time" in page.text
    assert "/maps/" not in page.text
    app = apps["flagged"]
    for seed in range(4, 12):
        answer = _predict(app, seed=seed)
        if not any(m["flagged"] for r in answer["results"] for m in r["methods"].values()):
            break
    else:
        pytest.fail("no unflagged request among the seeds")
    _sign_in(app)
    page = app.get(f"/dashboard/records/{answer['audit_record_id']}")
    assert (
        "CXR_DRIFT_KEEP_MAPS=flagged at the time and no drift result of this request was flagged" in page.text
    )
