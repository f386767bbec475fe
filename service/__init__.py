"""cxr-drift service side.

``service.engine`` is the pure science (CAMs, drift metrics, drift report): NumPy/SciPy only, no FastAPI,
no SQLAlchemy, no torch at import. The web app lives in ``service.app`` and is imported only when used.
"""
