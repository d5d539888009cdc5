"""The whole server on PostgreSQL: real processes, real agents, a change reaching exactly its nodes.

The same flows as tests/process/test_central_management.py, with config.toml
naming a PostgreSQL URL instead of the embedded SQLite default.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from bus.messages.datastore import MemberAdd, NodeRemove, NodeRename, VpnCreate
from tests.conftest import wait_until
from tests.helpers.server import AgentThread, CoterieServer, shared
from tests.process.test_group_commit import check_group_commit


def test_server_on_postgres_syncs_agents_and_survives_a_datastore_kill(pg_url: str, tmp_path: Path) -> None:
    server = CoterieServer(tmp_path, presence_timeout=5.0, database=pg_url).start()
    context = shared()
    agents: dict[str, AgentThread] = {}
    try:
        server.mutate(VpnCreate, name="a", subnet="10.1.0.0/24")
        server.mutate(VpnCreate, name="b", subnet="10.2.0.0/24")
        for name, vpns in (("n1", ["a"]), ("n2", ["a", "b"]), ("n3", ["b"])):
            agents[name] = AgentThread(tmp_path / name, server.add_node(name, vpns), heartbeat=0.4, context=context)
            agents[name].start()

        def peers(label: str) -> set[str]:
            view = agents[label].view
            return set(view.peers) if view is not None else set()

        assert wait_until(lambda: peers("n1") == {"n2"} and peers("n2") == {"n1", "n3"} and peers("n3") == {"n2"}, 30)

        os.kill(server.pids()["datastore"], signal.SIGKILL)
        server.mutate(NodeRename, name="n3", new_name="n3x")  # retried until the restarted datastore answers
        server.mutate(MemberAdd, node="n1", vpn="b")
        assert wait_until(lambda: peers("n1") == {"n2", "n3x"} and peers("n2") == {"n1", "n3x"}, 15)
        before = agents["n1"].applied
        server.mutate(NodeRemove, name="n3x")
        assert wait_until(lambda: "n3x" not in peers("n2") and "n3x" not in peers("n1"), 5)
        assert agents["n1"].applied > before
        truth = server.server_views()
        assert all(truth.get(agents[n].key) == agents[n].digest for n in ("n1", "n2")), "agents differ from the server"
    finally:
        for agent in agents.values():
            agent.stop()
        server.stop()
        context.term()


def test_group_commit_on_postgres(pg_url: str, tmp_path: Path) -> None:
    """Savepoints and one commit per group behave on PostgreSQL as on SQLite."""
    server = CoterieServer(tmp_path, database=pg_url).start()
    try:
        check_group_commit(server)
    finally:
        server.stop()
