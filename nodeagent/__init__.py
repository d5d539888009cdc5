"""The node agent: control loop and userspace data plane (later issues)."""
