"""cxr-drift training side: data, synthetic radiographs, architecture registry, two-stage training, export.

Importing this package is cheap: torch is imported only by the modules that need it, so the service can use
the torch-free parts (image decoding, preprocessing) without it.
"""
