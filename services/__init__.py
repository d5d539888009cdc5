"""The server's processes: one package per service, each its own OS process.

Services share nothing but the bus and the datastore. ``services.processes``
is the entry point that runs any one of them (or the broker); the
supervisor in ``services.supervisor`` runs them all and restarts the dead.
"""
