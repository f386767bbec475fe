"""The audit database: an append-only, hash-chained log of served predictions, and the API keys.

- :mod:`service.audit.db`: engines (SQLite, PostgreSQL), schema migrations, "database unavailable" errors.
- :mod:`service.audit.tables`: the tables (SQLAlchemy models), which the migrations create.
- :mod:`service.audit.hashing`: the row hash and canonical JSON (pure).
- :mod:`service.audit.chain`: the hash chain: append a request.
- :mod:`service.audit.verify`: verify the chain (whole, or after an anchored head; split over processes).
- :mod:`service.audit.stored`: a stored row's hash recomputed from its columns as SQL reads them.
- :mod:`service.audit.queries`: the filters, and reading records back: pages, one record, CSV export.
- :mod:`service.audit.summary`: aggregates of the drift rows in SQL (both dialects) and the stability ranking.

Import the module you need; this package re-exports nothing, so ``service.audit.db`` stays light.
"""
