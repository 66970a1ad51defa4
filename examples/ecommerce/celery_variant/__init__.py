"""The e-commerce order saga on Celery workers (see README.md beside this file)."""
