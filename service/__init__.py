"""The service layer: the FastAPI app (``service.app``), the audit database (``service.audit``) and the
prediction use case (``service.predict``). It builds on ``engine``, ``training`` and ``core`` and is imported
only by ``cli``.
"""
