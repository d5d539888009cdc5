"""Screens over the dashboard: forms, confirmation, join string, node detail, help."""
