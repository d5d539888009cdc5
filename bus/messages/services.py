"""Messages of the services (auth, datastore, keydist, fanout, relay).

The foundation gives each service only ping and health (bus.messages.common);
each service's own requests are added here as its issue lands.
"""

from __future__ import annotations

#: The services `coterie server up` runs, in start order after the broker.
SERVICE_NAMES = ("datastore", "auth", "keydist", "fanout", "relay")
