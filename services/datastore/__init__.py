"""The datastore service (one OS process; see service.py)."""
