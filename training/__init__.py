"""The model side: synthetic radiographs, the classifier wrapper, two-stage training and export.

It builds on ``core`` only; torch is imported by the modules that need it.
"""
