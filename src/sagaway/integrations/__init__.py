"""Integrations with other frameworks: each module is an extra (``sagaway[celery]``).

They depend on sagaway's public API; nothing in the core imports them.
"""
