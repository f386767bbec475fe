"""The governance dashboard: server-rendered pages under ``/dashboard`` (see ``routes``)."""
