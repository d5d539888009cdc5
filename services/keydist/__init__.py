"""The keydist service (one OS process; see service.py)."""
