"""The fanout service (one OS process; see service.py)."""
