"""Every router of the service, one per resource, included by :func:`include_routers`."""

from __future__ import annotations

from fastapi import FastAPI

from service.app.routes import admin, audit, health, models, predict

__all__ = ["include_routers"]


def include_routers(app: FastAPI) -> None:
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(predict.router)
    app.include_router(audit.router)
    app.include_router(admin.router)
