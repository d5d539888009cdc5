"""The auth service (one OS process; see service.py)."""
