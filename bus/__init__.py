"""Coterie's bus: the only code that touches ZeroMQ.

Outside, it is small: keys (bus.keys), the key registry (bus.registry),
message schemas and their codec (bus.messages, bus.codec), a client
(bus.client), a worker base class (bus.worker) and the broker (bus.broker).
"""
