"""The torch-free core every other layer builds on: vocabulary, errors, image IO, preprocessing, the dataset
index, the architecture registry's data and the artifact manifest.

Nothing here imports torch, FastAPI or SQLAlchemy, nor any other package of this project.
"""
