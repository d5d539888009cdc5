"""Authentication: join strings, enrollment tokens, password logins, password changes, users, audit.

Anonymous callers are allowed here and nowhere else: a node that has not
enrolled yet has no known key, and enrolling or logging in is how it gets
one. The caller's CURVE key (proven by its handshake) becomes the node's
key, so a stolen secret or password is useless to someone who cannot also
hold that connection; operator requests check the caller's role here.

Concurrency: argon2id costs ~120 ms and 64 MiB per hash, and a worker answers
one request at a time (the broker hands a worker its next request only after
its reply). So the auth process runs WORKERS connections to the broker, each
a Worker in its own thread, sharing one database engine, one Throttle and
HASH_SLOTS: at most that many hashes run at once (libsodium releases the GIL,
so they use the cores), while the other connections keep answering cheap
requests (throttled refusals, operator calls) during a flood. Throttling is
checked before hashing, so a flood from one address stops costing hashes
after a few failures (services/auth/limiter.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from sqlmodel import select

from bus import errors
from bus.errors import RemoteError
from bus.identity import Identity, Role
from bus.keys import KeyPair
from bus.messages.auth import (
    AuditLog,
    AuditRequest,
    Done,
    Enroll,
    Enrolled,
    JoinString,
    Login,
    PasswordChange,
    PasswordChangeAck,
    PasswordChanged,
    TokenCreate,
    TokenCreated,
    TokenList,
    TokenListRequest,
    TokenRevoke,
    UserAdd,
    UserAllow,
    UserList,
    UserListRequest,
    UserLock,
    UserRemove,
)
from bus.worker import Handler, Worker
from services.auth import accounts, audit, nodes, passwords, tokens
from services.auth.limiter import Throttle, keys_for
from services.datastore import repo
from services.datastore.db import make_engine, migrate, reading, transaction
from services.datastore.models import JoinToken, Node, Vpn, utcnow

log = logging.getLogger(__name__)
T = TypeVar("T")

WORKERS = 6  # connections to the broker in the auth process (threads)
HASH_SLOTS = 2  # argon2id hashes at once: 2 x 64 MiB; one per core of the reference machine
# Seconds a request waits for a hash slot before it is answered "busy, retry" (retriable). Short: a worker busy
# longer than the broker's heartbeat liveness (10 s, bus/constants.py) is dropped; a waiting one serves no one else.
HASH_WAIT = 0.5
KEEPALIVE = 0.5  # seconds between heartbeats of a worker waiting for a hash or a realm (broker liveness: 10 s)
REALM_THREADS = 4  # realm checks (LDAP, RADIUS) at once; they wait on the network, not on a core
THROTTLE_AUDIT_EVERY = 5.0  # seconds: refused attempts of one key are summed into one audit entry

#: The one refusal for an unknown user, a wrong password and a locked user (no enumeration).
REFUSED = "login refused: wrong user name or password, or the account is locked"
OPERATOR_ROLES = (Role.OPERATOR, Role.SERVICE)


class AuthCore:
    """What the auth workers of one process share."""

    def __init__(self, database_url: str, sign_key: str, join_endpoints: list[str], config: Any) -> None:
        self.engine = make_engine(database_url)
        migrate(self.engine)
        self.sign_key = sign_key
        self.join_endpoints = join_endpoints
        self.config = config
        self.throttle = Throttle()
        passwords.dummy_hash()  # now, not at the first unknown user (whose refusal would then take twice as long)
        self.hash_slots = threading.BoundedSemaphore(HASH_SLOTS)
        self.hash_pool = ThreadPoolExecutor(HASH_SLOTS, thread_name_prefix="argon2")
        self.realm_pool = ThreadPoolExecutor(REALM_THREADS, thread_name_prefix="realm")
        self._realms: dict[str, Any] | None = None
        self._realms_lock = threading.Lock()
        self._throttled: dict[str, tuple[int, float]] = {}  # key -> (refusals not yet audited, last audit)
        self._throttled_lock = threading.Lock()

    def hash(self, worker: Worker, fn: Callable[..., T], *args: Any) -> T:
        """Run one argon2id computation in a hash slot; the calling worker keeps heartbeating meanwhile.

        Raises a retriable ``service_unavailable`` when no slot frees up within HASH_WAIT.
        """
        if not self.hash_slots.acquire(timeout=HASH_WAIT):
            raise RemoteError(errors.SERVICE_UNAVAILABLE, "the auth service is busy; retry")
        try:
            return _wait(worker, self.hash_pool.submit(fn, *args))
        finally:
            self.hash_slots.release()

    def close(self) -> None:
        self.hash_pool.shutdown(wait=False, cancel_futures=True)
        self.realm_pool.shutdown(wait=False, cancel_futures=True)

    def realm(self, name: str) -> Any:
        """The proxy realm *name*, or None (realms load lazily: their module may be absent)."""
        with self._realms_lock:
            if self._realms is None:
                try:
                    from services.auth.realms import load_realms  # type: ignore[import-not-found]
                except ImportError:
                    self._realms = {}
                else:
                    self._realms = dict(load_realms(self.config)) if self.config is not None else {}
            return self._realms.get(name)

    def note_throttled(self, keys: list[str], user: str, source: str, retry_after: float) -> None:
        """Audit refused attempts in sums (a flood must not become a flood of audit rows)."""
        now = time.monotonic()
        key = keys[-1]
        with self._throttled_lock:
            count, last = self._throttled.get(key, (0, float("-inf")))
            count += 1
            due = now - last >= THROTTLE_AUDIT_EVERY
            self._throttled[key] = (0, now) if due else (count, last)
        if due:
            detail = f"{count} attempt(s) refused unchecked; retry after {retry_after:.1f}s"
            audit.write(self.engine, audit.LOGIN_THROTTLED, user, source, False, detail)


class AuthService(Worker):
    service = "auth"
    allow = (Role.ANONYMOUS, Role.NODE, Role.OPERATOR, Role.SERVICE)

    def __init__(
        self,
        endpoint: str,
        keypair: KeyPair,
        server_key: bytes,
        *,
        database_url: str,
        sign_key: str,
        join_endpoints: list[str] | None = None,
        config: Any = None,
        core: AuthCore | None = None,
        workers: int = WORKERS,
    ) -> None:
        super().__init__(endpoint, keypair, server_key)
        self.core = core or AuthCore(database_url, sign_key, join_endpoints or [endpoint], config)
        self.engine = self.core.engine
        self._siblings: list[AuthService] = []
        self._owns_core = core is None
        if core is None:  # the first worker of the process starts the others, sharing its core
            self._siblings = [
                AuthService(endpoint, keypair, server_key, database_url=database_url, sign_key=sign_key, core=self.core)
                for _ in range(workers - 1)
            ]

    def run(self) -> None:
        threads = [threading.Thread(target=s.run, name=f"auth-{i}", daemon=True) for i, s in enumerate(self._siblings)]
        for thread in threads:
            thread.start()
        try:
            super().run()
        finally:
            for sibling in self._siblings:
                sibling.stop()
            for thread in threads:
                thread.join(timeout=5)
            if self._owns_core:
                self.core.close()

    def stop(self) -> None:
        super().stop()
        for sibling in self._siblings:
            sibling.stop()

    def handlers(self) -> dict[type, Handler]:
        operator: dict[type, Handler] = {
            UserAdd: self.on_user_add,
            UserRemove: self.on_user_remove,
            UserLock: self.on_user_lock,
            UserAllow: self.on_user_allow,
            UserListRequest: self.on_user_list,
            TokenCreate: self.on_token_create,
            TokenListRequest: self.on_token_list,
            TokenRevoke: self.on_token_revoke,
            AuditRequest: self.on_audit,
        }
        guarded = {kind: _operators_only(handler) for kind, handler in operator.items()}
        return {
            **super().handlers(),
            **guarded,
            Enroll: self.on_enroll,
            Login: self.on_login,
            PasswordChange: self.on_password_change,
            PasswordChangeAck: self.on_password_ack,
        }

    # ------------------------------------------------------------------ enrollment (join strings and tokens)
    def on_enroll(self, request: Enroll, caller: Identity) -> Enrolled:
        if caller.role not in (Role.ANONYMOUS, Role.NODE):
            raise RemoteError(errors.REFUSED, "only nodes enroll")
        try:
            with transaction(self.engine) as session:
                join = session.exec(
                    select(JoinToken).where(JoinToken.secret_hash == repo.hash_secret(request.secret))
                ).first()
                if join is not None:
                    name = self._enroll_join(session, join, request, caller)
                else:
                    name = self._enroll_token(session, request, caller)
        except RemoteError as exc:
            log.warning("enrollment refused for %s from %s: %s", caller.caller, caller.address or "?", exc.message)
            audit.write(self.engine, audit.ENROLL_FAIL, caller.caller, caller.address, False, exc.message)
            raise
        log.info("node %s enrolled with key %s", name, caller.key)
        return Enrolled(node=name, server_sign_key=self.core.sign_key)

    def _enroll_join(self, session: Any, token: JoinToken, request: Enroll, caller: Identity) -> str:
        if token.used_at is not None:
            raise RemoteError(errors.REFUSED, "this join string has been used already; ask the operator for a new one")
        if tokens.aware(token.expires_at) < utcnow():
            raise RemoteError(errors.REFUSED, "this join string has expired; ask the operator for a new one")
        node = session.get(Node, token.node_id)
        assert node is not None
        if session.exec(select(Node).where(Node.curve_key == caller.key)).first() is not None:
            raise RemoteError(errors.REFUSED, "this key is already enrolled as another node")
        node.curve_key = caller.key
        node.sign_key = request.sign_key or None
        node.agent_version = request.agent_version or None
        token.used_at = utcnow()
        repo.record(session, "node.enroll", f"node {node.name} enrolled", f"node:{node.name}", [], [node.id or 0])
        audit.add(session, audit.ENROLL_OK, f"node:{node.name}", caller.address, True, "one-time join string")
        return str(node.name)

    def _enroll_token(self, session: Any, request: Enroll, caller: Identity) -> str:
        token = tokens.by_secret(session, request.secret)
        if token is None:
            raise RemoteError(errors.REFUSED, "unknown join secret (check the join string, or ask for a new one)")
        state = tokens.state(token, utcnow())
        if state != "valid":
            raise RemoteError(errors.REFUSED, tokens.REFUSALS[state])
        vpn = session.get(Vpn, token.vpn_id)
        if not (request.node_name or request.hostname):
            raise RemoteError(errors.INVALID, "an enrollment token needs a node name (--node-name)")
        name = nodes.node_name(request.node_name, "", request.hostname)
        token.uses += 1
        nodes.create(
            session,
            name,
            caller,
            [vpn],
            tags=token.tags,
            sign_key=request.sign_key,
            agent_version=request.agent_version,
            owner=None,
            kind="node.enroll",
            summary=f"node {name} enrolled with token #{token.id} into {vpn.name}",
        )
        detail = f"token #{token.id} ({token.uses}/{token.max_uses or 'unlimited'} uses) -> node {name} in {vpn.name}"
        audit.add(session, audit.TOKEN_USE, f"node:{name}", caller.address, True, detail)
        return name

    # ------------------------------------------------------------------ password login
    def on_login(self, request: Login, caller: Identity) -> Enrolled:
        if caller.role is not Role.ANONYMOUS:
            raise RemoteError(errors.REFUSED, "this key is already a node's key; a new node logs in with a new key")
        user = request.user
        self._verify(user, request.password, caller, audit.LOGIN_FAIL)
        try:
            with transaction(self.engine) as session:
                vpns = accounts.allowed_vpns(session, user)
                name = nodes.node_name(request.node_name, user, request.hostname)
                where = f" into {', '.join(v.name for v in vpns)}" if vpns else " (no VPN allowed yet)"
                nodes.create(
                    session,
                    name,
                    caller,
                    vpns,
                    tags=[],
                    sign_key=request.sign_key,
                    agent_version=request.agent_version,
                    owner=user,
                    kind="node.login",
                    summary=f"node {name} logged in as {user}{where}",
                )
                audit.add(session, audit.LOGIN_OK, user, caller.address, True, f"node {name}{where}")
        except RemoteError as exc:
            detail = f"after the password: {exc.message}"
            audit.write(self.engine, audit.LOGIN_FAIL, user, caller.address, False, detail)
            raise
        log.info("user %s logged in node %s from %s", user, name, caller.address or "?")
        return Enrolled(node=name, server_sign_key=self.core.sign_key)

    def _verify(self, user: str, password: str, caller: Identity, fail_event: str) -> None:
        """Return if *password* is *user*'s; otherwise throttle, audit and raise the one refusal."""
        keys = keys_for(user, caller.address)
        verdict = self.core.throttle.begin(keys, time.monotonic())
        if not verdict.allowed:
            self.counters["throttled"] += 1
            if verdict.lockout:
                detail = f"{verdict.lockout} blocked for {verdict.retry_after:.0f}s: kept trying while blocked"
                audit.write(self.engine, audit.LOCKOUT, user, caller.address, False, detail)
                log.warning("lockout: %s", detail)
            self.core.note_throttled(keys, user, caller.address, verdict.retry_after)
            raise RemoteError(
                errors.REFUSED, f"too many failed attempts; try again in {max(1, round(verdict.retry_after))} s"
            )
        try:
            ok, reason = self._check(user, password)
        finally:
            self.core.throttle.end(keys)
        if ok:
            self.core.throttle.success(keys)
            return
        self.counters["login_failures"] += 1
        with transaction(self.engine) as session:
            audit.add(session, fail_event, user, caller.address, False, reason)
            for step in self.core.throttle.failure(keys, time.monotonic()):
                if step.lockout:
                    detail = f"{step.key} blocked for {step.delay:.0f}s after repeated failures"
                    audit.add(session, audit.LOCKOUT, user, caller.address, False, detail)
                    log.warning("lockout: %s", detail)
        raise RemoteError(errors.REFUSED, REFUSED)

    def _check(self, user: str, password: str) -> tuple[bool, str]:
        """(ok, reason for the audit). Every local path costs one argon2id verification."""
        if accounts.is_realm_user(user) and accounts.USER_NAME.match(user):
            return self._check_realm(user, password)
        with reading(self.engine) as session:
            row = accounts.find(session, user)
        stored = row.password_hash if row is not None and row.password_hash else None
        matches = self.core.hash(self, passwords.verify_password, stored or passwords.dummy_hash(), password)
        if stored is None:
            return False, "unknown user"
        if not matches:
            return False, "wrong password"
        assert row is not None
        if row.locked:
            return False, "user is locked"
        if passwords.needs_rehash(stored):
            self._rehash(user, stored, password)
        return True, "accepted"

    def _rehash(self, user: str, stored: str, password: str) -> None:
        fresh = self.core.hash(self, passwords.hash_password, password)
        with transaction(self.engine) as session:
            row = accounts.find(session, user)
            if row is not None and row.password_hash == stored:  # unchanged meanwhile
                row.password_hash = fresh
        log.info("password hash of %s upgraded to %s", user, passwords.CURRENT)

    def _check_realm(self, user: str, password: str) -> tuple[bool, str]:
        local, realm_name = user.split("@", 1)
        realm = self.core.realm(realm_name)
        if realm is None:
            # An unknown realm costs what a local user costs.
            self.core.hash(self, passwords.verify_password, passwords.dummy_hash(), password)
            return False, f"no realm named {realm_name!r}"
        with reading(self.engine) as session:
            row = accounts.find(session, user)
        try:
            verdict = _wait(self, self.core.realm_pool.submit(realm.authenticate, local, password))
        except Exception as exc:  # RealmUnavailable, after the realm's own retries
            log.error("realm %s unavailable: %s", realm_name, exc)
            raise RemoteError(
                errors.REFUSED, f"the directory of realm {realm_name} is unreachable; try again later"
            ) from None
        if not verdict.ok:
            return False, f"realm {realm_name}: {verdict.reason}"
        if row is not None and row.locked:
            return False, "user is locked"
        return True, f"realm {realm_name}: {verdict.reason}"

    # ------------------------------------------------------------------ password change
    def on_password_change(self, request: PasswordChange, caller: Identity) -> PasswordChanged:
        user = request.user
        if caller.role is Role.NODE and not user:
            with reading(self.engine) as session:
                user = accounts.owner_of(session, caller.name) or ""
            if not user:
                raise RemoteError(errors.INVALID, "this node was not logged in by a user; name the user with --user")
        if not user:
            raise RemoteError(errors.INVALID, "name the user whose password changes")
        if accounts.is_realm_user(user):
            realm = user.split("@", 1)[1]
            raise RemoteError(errors.REFUSED, f"the directory of realm {realm} owns this password; change it there")
        problem = passwords.check_new_password(request.new_password)
        if problem is not None:
            raise RemoteError(errors.INVALID, problem)
        self._verify(user, request.old_password, caller, audit.PASSWORD_CHANGE_FAIL)
        fresh = self.core.hash(self, passwords.hash_password, request.new_password)
        with transaction(self.engine) as session:
            row = accounts.get(session, user)
            row.password_hash = fresh
            row.password_changed_at = utcnow()
            entry = audit.add(session, audit.PASSWORD_CHANGE, user, caller.address, True, f"by {caller.caller}")
        log.info("password of %s changed by %s from %s", user, caller.caller, caller.address or "?")
        return PasswordChanged(user=user, change_id=entry.id or 0)

    def on_password_ack(self, request: PasswordChangeAck, caller: Identity) -> Done:
        detail = f"change #{request.change_id} acknowledged by {caller.caller}"
        audit.write(self.engine, audit.PASSWORD_ACK, caller.caller, caller.address, True, detail)
        log.info("password %s", detail)
        return Done(summary=detail)

    # ------------------------------------------------------------------ operator: users
    def on_user_add(self, request: UserAdd, caller: Identity) -> Done:
        accounts.check_name(request.name)
        problem = passwords.check_new_password(request.password)
        if problem is not None:
            raise RemoteError(errors.INVALID, problem)
        hashed = self.core.hash(self, passwords.hash_password, request.password)

        def apply(session: Any) -> str:
            accounts.add(session, request.name, hashed)
            return f"added user {request.name}"

        return self._operator(caller, apply)

    def on_user_remove(self, request: UserRemove, caller: Identity) -> Done:
        def apply(session: Any) -> str:
            session.delete(accounts.get(session, request.name))
            return f"removed user {request.name}"

        return self._operator(caller, apply)

    def on_user_lock(self, request: UserLock, caller: Identity) -> Done:
        def apply(session: Any) -> str:
            accounts.get(session, request.name).locked = request.locked
            return f"{'locked' if request.locked else 'unlocked'} user {request.name}"

        return self._operator(caller, apply)

    def on_user_allow(self, request: UserAllow, caller: Identity) -> Done:
        return self._operator(caller, lambda s: accounts.allow(s, request.name, request.vpn, request.allow))

    def on_user_list(self, request: UserListRequest, caller: Identity) -> UserList:
        with reading(self.engine) as session:
            return UserList(users=accounts.listing(session))

    # ------------------------------------------------------------------ operator: tokens and audit
    def on_token_create(self, request: TokenCreate, caller: Identity) -> TokenCreated:
        with transaction(self.engine) as session:
            token, secret = tokens.create(
                session,
                request.vpn,
                reusable=request.reusable,
                uses=request.uses,
                expires_hours=request.expires_hours,
                tags=request.tags,
                actor=caller.caller,
            )
            uses = "unlimited uses" if token.max_uses is None else f"{token.max_uses} use(s)"
            summary = f"created token #{token.id} for VPN {request.vpn} ({uses}, {request.expires_hours:g} h)"
            audit.add(session, audit.OPERATOR, caller.caller, caller.address, True, summary)
        join = JoinString(
            endpoints=self.core.join_endpoints,
            server_key=self.server_key.decode(),
            sign_key=self.core.sign_key,
            secret=secret,
        )
        return TokenCreated(id=token.id or 0, join=join.encode(), summary=summary)

    def on_token_list(self, request: TokenListRequest, caller: Identity) -> TokenList:
        with reading(self.engine) as session:
            return TokenList(tokens=tokens.listing(session))

    def on_token_revoke(self, request: TokenRevoke, caller: Identity) -> Done:

        def apply(session: Any) -> str:
            tokens.revoke(session, request.id)
            return f"revoked token #{request.id}"

        return self._operator(caller, apply)

    def on_audit(self, request: AuditRequest, caller: Identity) -> AuditLog:
        with reading(self.engine) as session:
            entries, head = audit.read(session, request.since, request.limit)
        return AuditLog(entries=entries, head=head)

    def _operator(self, caller: Identity, apply: Any) -> Done:
        """Run an operator's change and its audit entry in one transaction."""
        with transaction(self.engine) as session:
            summary = apply(session)
            audit.add(session, audit.OPERATOR, caller.caller, caller.address, True, summary)
        log.info("%s by %s", summary, caller.caller)
        return Done(summary=summary)


def _wait(worker: Worker, future: Future[T]) -> T:
    """The future's result, heartbeating the broker every KEEPALIVE seconds until it is there."""
    while True:
        try:
            return future.result(timeout=KEEPALIVE)
        except FutureTimeout:
            worker.keepalive()


def _operators_only(handler: Handler) -> Handler:
    def guarded(request: Any, caller: Identity) -> Any:
        if caller.role not in OPERATOR_ROLES:
            log.warning("refused: %s may not send %s to auth", caller.caller, request.KIND)
            raise RemoteError(errors.FORBIDDEN, "operators only")
        return handler(request, caller)

    return guarded
