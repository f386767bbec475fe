"""Service settings: environment variables prefixed ``CXR_DRIFT_``, validated, built on demand.

Nothing is read at import time: :func:`get_settings` builds (and caches) them when the app or a command asks.
Values that would make the service unsafe or unusable are refused with a message naming the variable, what
arrived and what is accepted.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.vocabulary import BACKENDS, KEEP_MAPS, ROLES
from service.app.keys import check_key_name

__all__ = ["ROLES", "Settings", "SettingsKey", "get_settings"]

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_UNITS = {
    "decode_wait_s": "seconds",
    "body_read_timeout_s": "seconds",
    "max_pixels_per_byte": "pixels per byte",
}


@dataclass(frozen=True)
class SettingsKey:
    """An API key given in the settings: its name, role and the SHA-256 hex digest of the plaintext key."""

    name: str
    role: str
    sha256: str


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Everything the service can be configured with (environment: ``CXR_DRIFT_<NAME>``)."""

    model_config = SettingsConfigDict(env_prefix="CXR_DRIFT_", extra="ignore", frozen=True)

    artifacts_dir: Path = Path("./artifacts")
    database_url: str = "sqlite:///./cxr-drift.db"
    # "name:role:sha256hex" entries; from the environment as a comma-separated list or a JSON list
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    auth_enabled: bool = True
    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    # declared pixels per byte of the uploaded file above which an image over 4 Mpx is refused (422)
    max_pixels_per_byte: float = 100.0
    # decodes running at once; a request waits at most decode_wait_s for a slot, then gets 503 + Retry-After
    max_concurrent_decodes: int = 2
    decode_wait_s: float = 2.0
    # seconds a request body may take to arrive (each wait for the next chunk, and the whole body): else 408
    body_read_timeout_s: float = 30.0
    host: str = "127.0.0.1"
    port: int = 8000
    backend: Literal["onnx", "torch"] = "onnx"
    migrate_on_start: bool = True
    # intra-op threads per model session; None: with batching on, the usable cores // concurrent_forwards (1 with
    # the default gate), with batching off the runtime's default (inference.session_threads)
    ort_threads: int | None = None
    # the manifest HMAC key (core.manifest.MANIFEST_KEY_ENV): set, every pair's manifest must carry its HMAC
    manifest_key: SecretStr | None = None
    # where the forwards run (engine.runtime.DEVICES): cpu, cuda (error if unusable), auto (GPU when usable)
    device: str = "cpu"
    # dynamic batching across requests (service/app/inference.py): one queue per model pair and checkpoint
    batching: bool = True
    batch_window_ms: float = 5.0  # how long the oldest waiting request waits for others to join its batch
    max_batch: int = 16  # images per batched forward
    # batched forwards running at once across every pair and checkpoint (engine/batching.py, the gate);
    # None: the usable cores (the others' requests queue meanwhile and go as bigger batches)
    concurrent_forwards: int | None = None
    # batching on: request threads doing their own CPU work (preprocessing, CAMs, metrics) at once, the others
    # wait (engine.batching.ComputeSlot; a thread waiting for its forward holds none); 0: no bound
    concurrent_compute: int = 1
    # requests admitted to inference at once (running or waiting); one more is answered 503 at once
    queue_bound: int = 32
    # The browser dashboard (service/dashboard): the key that signs its session cookies (unset: a random one
    # per process start, so sessions end at a restart and differ between replicas), the cookie's Secure
    # flag (set it behind HTTPS) and how long a session lasts.
    dashboard_secret: SecretStr | None = None
    dashboard_cookie_secure: bool = False
    dashboard_session_minutes: int = 480
    # Maps for review (engine/review_maps.py): keep each request's attribution maps, box-downsampled to 16x16
    # and quantised to uint8, in the audit record's hashed payload: none (default), flagged (only requests
    # with a flagged drift result) or all. Never the image.
    keep_maps: Literal["none", "flagged", "all"] = "none"
    # time limits on the database (service.audit.db.DbTimeouts): one operation of a request (append with its
    # chain lock, key lookup, readiness check), and the audit reads (summaries, listings, verify, CSV export)
    db_timeout_s: float = 5.0
    db_read_timeout_s: float = 120.0
    # processes a long /audit/verify walk is split over (service.audit.verify); None: the usable cores, at
    # most 4; 1: walk in the request's thread
    verify_workers: int | None = None
    # PostgreSQL least privilege: `cxr-drift db upgrade` (run as the owner) also creates/grants this role,
    # which can only INSERT and SELECT the audit tables; the service connects as it
    service_role: str | None = None
    service_role_password: SecretStr | None = None
    # the chain head exported outside the database every anchor_interval_s seconds (0: off) as a JSON line,
    # to anchor_file (if set) and the log, HMAC-SHA256-signed with anchor_key (if set)
    anchor_interval_s: float = 300.0
    anchor_file: Path | None = None
    anchor_key: SecretStr | None = None
    # the models a /predict without models= runs: names or architectures (an architecture = its default
    # version, engine.predict.resolve_models), comma-separated or a JSON list; empty: every served pair
    default_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # true: one model folder that fails to load makes /readyz 503; false: ready while at least one serves
    strict_models: bool = True

    @field_validator("api_keys", "default_models", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        """A list from the environment: comma-separated, or a JSON list."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: list[str]) -> list[str]:
        names: set[str] = set()
        digests: dict[str, str] = {}
        for entry in value:
            key = _parse_key(entry)
            if key.name in names:
                raise ValueError(f"api_keys: the key name {key.name!r} appears twice; names must be unique")
            if key.sha256 in digests:
                # one secret, two entries: which name and role would a request get?
                raise ValueError(
                    f"api_keys: keys {digests[key.sha256]!r} and {key.name!r} have the same SHA-256; "
                    "each key must be a different secret"
                )
            names.add(key.name)
            digests[key.sha256] = key.name
        return value

    @field_validator("max_body_bytes", "max_pixels")
    @classmethod
    def _positive(cls, value: int, info: object) -> int:
        if value <= 0:
            field = getattr(info, "field_name", "value")
            raise ValueError(f"{field} must be a positive integer, got {value}")
        return value

    @field_validator("max_concurrent_decodes")
    @classmethod
    def _check_decodes(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"max_concurrent_decodes must be >= 1, got {value}")
        return value

    @field_validator("max_pixels_per_byte", "decode_wait_s", "body_read_timeout_s")
    @classmethod
    def _positive_finite(cls, value: float, info: object) -> float:
        import math

        if not math.isfinite(value) or value <= 0:
            field = getattr(info, "field_name", "value")
            raise ValueError(
                f"{field} must be a positive number of {_UNITS.get(field, 'units')}, got {value}"
            )
        return value

    @field_validator("db_timeout_s", "db_read_timeout_s")
    @classmethod
    def _check_db_timeout(cls, value: float, info: object) -> float:
        field = getattr(info, "field_name", "value")
        if not 0.1 <= value <= 3600:
            raise ValueError(f"{field} must be in 0.1..3600 seconds, got {value}")
        return value

    @field_validator("concurrent_forwards", "verify_workers")
    @classmethod
    def _check_core_count(cls, value: int | None, info: object) -> int | None:
        field = getattr(info, "field_name", "value")
        high, unset = {"concurrent_forwards": (256, "the usable cores")}.get(
            field, (64, "the usable cores, at most 4")
        )
        if value is not None and not 1 <= value <= high:
            raise ValueError(f"{field} must be 1..{high} (or unset: {unset}), got {value}")
        return value

    @field_validator("anchor_interval_s")
    @classmethod
    def _check_anchor_interval(cls, value: float) -> float:
        if value != 0 and not 1 <= value <= 86_400:
            raise ValueError(f"anchor_interval_s must be 0 (off) or 1..86400 seconds, got {value}")
        return value

    @field_validator("port")
    @classmethod
    def _check_port(cls, value: int) -> int:
        if not 1 <= value <= 65535:
            raise ValueError(f"port must be in 1..65535, got {value}")
        return value

    @field_validator("dashboard_secret")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError(
                "dashboard_secret must be at least 32 characters (e.g. `python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'`), or unset for a random one per start"
            )
        return value

    @field_validator("dashboard_session_minutes")
    @classmethod
    def _check_session_minutes(cls, value: int) -> int:
        if not 1 <= value <= 7 * 24 * 60:
            raise ValueError(f"dashboard_session_minutes must be in 1..10080 (one week), got {value}")
        return value

    @field_validator("ort_threads")
    @classmethod
    def _check_threads(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"ort_threads must be >= 1 (or unset: inference.session_threads), got {value}")
        return value

    @field_validator("concurrent_compute")
    @classmethod
    def _check_concurrent_compute(cls, value: int) -> int:
        if not 0 <= value <= 256:
            raise ValueError(f"concurrent_compute must be 0..256 (0: no bound), got {value}")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        from engine.runtime import DEVICES

        text = value.strip().lower()
        if text not in DEVICES and not (text.startswith("cuda:") and text[5:].isdigit()):
            raise ValueError(f"device must be one of {', '.join(DEVICES)} (or cuda:N); got {value!r}")
        return text

    @field_validator("batch_window_ms")
    @classmethod
    def _check_window(cls, value: float) -> float:
        if not 0.0 <= value <= 1000.0:
            raise ValueError(f"batch_window_ms must be in 0..1000 (milliseconds), got {value}")
        return value

    @field_validator("max_batch", "queue_bound")
    @classmethod
    def _at_least_one(cls, value: int, info: object) -> int:
        if value < 1:
            field = getattr(info, "field_name", "value")
            raise ValueError(f"{field} must be >= 1, got {value}")
        return value

    @field_validator("keep_maps", mode="before")
    @classmethod
    def _check_keep_maps(cls, value: object) -> object:
        text = value.strip().lower() if isinstance(value, str) else value
        if isinstance(value, str) and text not in KEEP_MAPS:
            raise ValueError(f"keep_maps must be one of {', '.join(KEEP_MAPS)}; got {value!r}")
        return text

    @field_validator("backend", mode="before")
    @classmethod
    def _check_backend(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {value!r}")
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        import sqlalchemy as sa

        expected = "a SQLite (sqlite:///path) or PostgreSQL (postgresql+psycopg://USER@HOST/DB) URL"
        try:
            url = sa.make_url(value)
        except Exception as exc:  # sqlalchemy.exc.ArgumentError is not a ValueError
            raise ValueError(f"database_url must be {expected}; cannot parse {value!r}") from exc
        shown = url.render_as_string(hide_password=True)
        backend, driver = url.get_backend_name(), url.get_driver_name()
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"database_url must be {expected}, got {shown!r}")
        if backend == "postgresql" and driver != "psycopg":
            raise ValueError(
                f"database_url: PostgreSQL is reached through psycopg 3: write 'postgresql+psycopg://...', "
                f"got driver {driver!r} in {shown!r}"
            )
        return value

    @model_validator(mode="after")
    def _refuse_open_unauthenticated(self) -> Settings:
        if not self.auth_enabled and not _is_loopback(self.host):
            raise ValueError(
                f"auth_enabled=false is only allowed on a loopback host (127.0.0.1, ::1, localhost); "
                f"host is {self.host!r}. Enable auth or bind to loopback"
            )
        return self

    def manifest_key_bytes(self) -> bytes | None:
        """The manifest HMAC key as bytes, or None when unset or empty."""
        value = self.manifest_key.get_secret_value() if self.manifest_key is not None else ""
        return value.encode("utf-8") if value else None

    def settings_keys(self) -> list[SettingsKey]:
        """The API keys given in the settings, parsed."""
        return [_parse_key(entry) for entry in self.api_keys]


def _parse_key(entry: str) -> SettingsKey:
    parts = entry.strip().split(":")
    if len(parts) != 3 or not parts[0]:
        raise ValueError(f"api_keys entries must look like 'name:role:sha256hex', got {entry!r}")
    name, role, digest = parts[0], parts[1].lower(), parts[2].lower()
    try:
        check_key_name(name)
    except ValueError as exc:
        raise ValueError(f"api_keys: {exc}") from None
    if role not in ROLES:
        raise ValueError(f"api key {name!r}: unknown role {parts[1]!r}; valid options: {', '.join(ROLES)}")
    if not _SHA256_HEX.match(digest):
        raise ValueError(
            f"api key {name!r}: expected the SHA-256 of the key as 64 hex digits, "
            f"got {len(parts[2])} characters"
        )
    return SettingsKey(name=name, role=role, sha256=digest)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment once (``get_settings.cache_clear()`` to re-read)."""
    return Settings()
