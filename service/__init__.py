"""The service layer: the FastAPI app (``service.app``) over the prediction use case (``engine.predict``),
the audit database (``service.audit``) and the demo. It builds on ``engine``, ``training`` and ``core`` and is
imported only by ``cli``.
"""
