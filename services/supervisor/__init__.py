"""The supervisor behind ``coterie server up`` (see supervisor.py)."""
