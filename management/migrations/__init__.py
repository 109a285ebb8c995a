"""The model DB's schema history as Alembic revisions, run in code by ``management/migrate.py``."""
