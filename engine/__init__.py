"""The science: closed-form CAMs, drift metrics, the drift report, calibration and the offline study.

Nothing here imports FastAPI or SQLAlchemy, nor torch at import time (``engine.runtime``'s torch backend
and ``engine.reference`` import it when used).
"""
