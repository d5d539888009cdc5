"""The dashboard's widgets, one per file; each renders part of a ServerState."""
