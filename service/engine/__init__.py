"""Pure attribution and drift science: closed-form CAMs, drift metrics, drift reports.

Nothing here imports FastAPI, SQLAlchemy or (at import time) torch.
"""
