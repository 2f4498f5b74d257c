"""The storage SCP's association server: the accept loop only accepts; everything that waits on a peer runs in the
connection's own thread with a time limit.

pynetdicom's server wraps TLS in its accept loop, so one silent TLS client stalls every other sender. Here the
accept loop asks the :class:`~.gate.ConnectionGate` (pending limits) and hands the socket to a thread; that
thread does the TLS handshake (bounded by ``tls.handshake_timeout_seconds`` and the pending timeout), then runs
the association, whose wait for the A-ASSOCIATE-RQ is bounded by what is left of the pending timeout.

Hostile or broken peers (found by ``make fuzz-pacs``): pynetdicom's threads raise on some malformed requests and
timings (its reading thread, the DUL reactor, on an even presentation context ID or an event that is invalid in the
current state, e.g. the local A-ASSOCIATE-AC after the peer aborted; the association thread on a presentation
context without an abstract syntax), which would end them through ``threading.excepthook``; here each is caught,
logged as one ``malformed_pdu`` refusal, and the connection closed. Once an A-ABORT or A-RELEASE-RP is sent (state
Sta13) the node closes the connection: pynetdicom would read on until ARTIM expires, decoding and logging every junk
PDU a peer streams. A peer that closes before its A-ASSOCIATE-RQ frees its pending slot at once.
"""

from __future__ import annotations

import logging
import select
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from .gate import ConnectionGate, Refusals
from .limits import Limits

logger = logging.getLogger(__name__)


def connection_key(address: Any) -> tuple:
    """``(host, port)`` of a peer: the key of its connection in the gate."""
    return tuple(address[:2])


class _GuardedHandler(RequestHandler):
    """One connection: TLS handshake, then the association, run to its end in this thread."""

    server: GuardedServer

    def handle(self) -> None:
        srv, key, started = self.server, connection_key(self.client_address), time.monotonic()
        try:
            if srv.ssl_context is not None and not self._handshake(key, started):
                return
            # a read that stalls mid-PDU gives up (pynetdicom would wait for ever); raised to the network timeout
            # once the A-ASSOCIATE-RQ is in (the receiver's EVT_REQUESTED handler)
            self.request.settimeout(srv.limits.pending_timeout_seconds)
            if not self._wait_for_data(started):
                return
            assoc = self._create_association()
            assoc.fairdro_key = key  # read by the node's EVT_REQUESTED and EVT_DATA_RECV handlers
            assoc.acse_timeout = max(0.05, srv.limits.pending_timeout_seconds - (time.monotonic() - started))
            # ARTIM (30 s in pynetdicom): how long a peer that sent junk or was refused may keep the socket open
            assoc.dul.artim_timer.timeout = srv.limits.pending_timeout_seconds
            self._requested = False  # set by _on_transition when the DUL reads an A-ASSOCIATE-RQ (Evt6)
            assoc.bind(evt.EVT_FSM_TRANSITION, self._on_transition)
            _guard_thread(assoc.dul, lambda err: self._thread_failed(assoc, key, "reading (DUL)", err))
            _guard_thread(assoc, lambda err: self._thread_failed(assoc, key, "association", err))
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            assoc.join()
        finally:
            conn = srv.gate.close(key)
            if conn is not None and conn.state == "pending":
                self._report_pending(key, conn.got_data, time.monotonic() - started)

    def _wait_for_data(self, started: float) -> bool:
        """Block (no polling) until the peer sends its first bytes or the pending timeout passes. pynetdicom's
        association thread polls its socket every millisecond: started for each of 50 silent connections, those
        threads took the CPU from the inference of real senders."""
        remaining = self.server.limits.pending_timeout_seconds - (time.monotonic() - started)
        sock = self.request
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        if remaining > 0 and select.select([sock], [], [], remaining)[0]:
            return True
        return False

    def _on_transition(self, event: evt.Event) -> None:
        """Every state change of the connection (pynetdicom's DUL thread): before the A-ASSOCIATE-RQ, Evt19 (an
        unrecognised or invalid PDU) marks a malformed first PDU, and Sta1 (the peer closed) wakes the association
        thread waiting for the request; entering Sta13 (A-ABORT or A-RELEASE-RP sent) closes the connection at once:
        pynetdicom would otherwise decode (and log) every PDU the peer still sends, until ARTIM expires."""
        if event.fsm_event == "Evt6":
            self._requested = True
        elif event.fsm_event == "Evt19" and not self._requested:
            self.server.gate.saw_data(connection_key(self.client_address))
        if event.next_state == "Sta13":
            event.assoc.dul.socket.close()  # queues Evt17 (transport closed): Sta13 -> Sta1
        elif event.next_state == "Sta1" and not self._requested:
            event.assoc.dul.to_user_queue.put(None)  # read as "no A-ASSOCIATE-RQ": the association ends now

    def _thread_failed(self, assoc: Any, key: tuple, part: str, err: Exception) -> None:
        """pynetdicom's reading or association thread raised (see the module docstring) and has ended: one refusal
        line, then the connection is closed and the other thread ends too."""
        peer = f"connection from {key[0]}:{key[1]}"
        self.server.refusals.refuse("malformed_pdu", peer, f"pynetdicom's {part} thread stopped on it "
                                    f"({type(err).__name__}: {err}); connection closed")  # fmt: skip
        self.server.gate.refused(key)  # counted here, not again as a pending connection
        _stop_reading(self.request)  # the DUL reads end-of-stream and closes the connection (state Sta1)
        if not self._requested:
            assoc.dul.to_user_queue.put(None)  # the association thread stops waiting for an A-ASSOCIATE-RQ
        if part == "association":
            assoc.kill()  # waits for the DUL to reach Sta1, then ends it

    def _handshake(self, key: tuple, started: float) -> bool:
        srv = self.server
        limit = min(srv.handshake_timeout, srv.limits.pending_timeout_seconds)
        self.request.settimeout(limit)
        try:
            wrapped = srv.ssl_context.wrap_socket(self.request, server_side=True)
        except (ssl.SSLError, OSError) as err:
            timed_out = isinstance(err, TimeoutError) or time.monotonic() - started >= limit
            cause = "pending_timeout" if timed_out else "tls_handshake"
            detail = f"no TLS handshake within {limit:g} s" if timed_out else getattr(err, "reason", None) or err
            srv.refusals.refuse(cause, f"TLS connection from {key[0]}:{key[1]}", str(detail))
            return False
        self.request = wrapped
        return True

    def _report_pending(self, key: tuple, got_data: bool, elapsed: float) -> None:
        peer, timeout = f"connection from {key[0]}:{key[1]}", self.server.limits.pending_timeout_seconds
        if got_data:
            self.server.refusals.refuse("malformed_pdu", peer, "data that is not an A-ASSOCIATE-RQ came first")
        elif elapsed >= timeout - 0.05:
            self.server.refusals.refuse("pending_timeout", peer, f"no A-ASSOCIATE-RQ within {timeout:g} s")
        else:
            logger.debug("Connection from %s:%s closed before an A-ASSOCIATE-RQ.", *key)


def _guard_thread(thread: threading.Thread, on_error: Callable[[Exception], None]) -> None:
    """Run a pynetdicom thread (an association or its DUL reactor) inside ``try``: ``on_error`` gets what it raises,
    which then never reaches ``threading.excepthook``. pynetdicom gives both threads their target at construction,
    so the target (``Thread._target``) is wrapped before the thread starts."""
    target = thread._target

    def run() -> None:
        try:
            target()
        except Exception as err:  # noqa: BLE001 (reported by on_error)
            on_error(err)

    thread._target = run


def _stop_reading(sock: socket.socket) -> None:
    """Shut the reading side of a connection (the DUL then reads end-of-stream and closes it); a TLS socket too,
    at the TCP level. Closed sockets are ignored."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RD)
    except OSError:
        pass


class GuardedServer(ThreadedAssociationServer):
    """:class:`ThreadedAssociationServer` whose accept loop never waits on a peer (see the module docstring)."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, gate: ConnectionGate, refusals: Refusals, limits: Limits,
                 handshake_timeout: float = 10.0, **kwargs: Any):  # fmt: skip
        self.gate, self.refusals, self.limits = gate, refusals, limits
        self.handshake_timeout = float(handshake_timeout)
        super().__init__(*args, request_handler=_GuardedHandler, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept only: the TLS handshake runs in the connection's thread."""
        return self.socket.accept()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Called by the accept loop: the pending-connection limits (over a limit the socket is closed)."""
        return self.gate.admit(connection_key(client_address))

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # one connection's failure is logged and never reaches the accept loop
            logger.exception("Connection from %s failed.", client_address)
        finally:
            self.shutdown_request(request)

    def shutdown(self) -> None:
        """Stop the accept loop and close the listening socket (the AE's own server list is not used)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def start_server(ae: Any, address: tuple[str, int], handlers: list, ssl_context: ssl.SSLContext | None,
                 **guards: Any) -> GuardedServer:  # fmt: skip
    """Bind a :class:`GuardedServer` for ``ae`` and serve it in a daemon thread; returns the running server."""
    server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=handlers, server_class=GuardedServer,
                            **guards)  # fmt: skip
    thread = threading.Thread(target=server.serve_forever, name="dicom-node-accept", daemon=True)
    thread.start()
    return server
