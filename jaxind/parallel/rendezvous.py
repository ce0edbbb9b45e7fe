"""A bounded start of a multi-process run (docs/DESIGN.md §5.12): the coordinator address checked up front,
every process accounted for before ``jax.distributed`` starts, one ``error:`` line instead of a hang or an abort.

``jax.distributed.initialize`` waits silently for the missing processes and then aborts the process from C++
(``SIGABRT``, a stack dump; nothing Python can catch). So before it, the processes meet in a small TCP
handshake of their own on the coordinator's port: process 0 listens there, each other process connects and
says who it is; process 0 knows who is missing and says so every few seconds; when all are there it answers
``go`` to everyone, closes the port, and JAX's coordination service takes it over. A process that is still
alone at the deadline ends with one line. A :class:`Watchdog` bounds what remains (``jax.distributed``'s own
connection, or a start JAX configures from the environment) the same way: one line and exit 1 before JAX's
own, longer, timeout would abort.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable

from jaxind.errors import JaxindError

__all__ = ["Watchdog", "bounded", "check_address", "host", "join", "parse_address"]

_HELLO = "jaxind-rendezvous 1"
_RETRY_S = 0.5


def parse_address(text: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``, port in 1..65535.

    Raises:
      JaxindError: no port, a port that is not a number or out of range, or no host.
    """
    host, sep, port = text.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise JaxindError(
            f"--coordinator_address={text}: expected HOST:PORT of process 0 with a port in 1..65535, "
            "e.g. --coordinator_address=10.0.0.1:1234"
        )
    return host, int(port)


def check_address(text: str) -> tuple[str, int]:
    """:func:`parse_address`, and the host resolves (a typo fails now, not after a silent wait).

    Raises:
      JaxindError: malformed, or the host name does not resolve.
    """
    host, port = parse_address(text)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        reason = e.strerror if isinstance(e, socket.gaierror) else str(e)
        raise JaxindError(
            f"--coordinator_address={text}: host {host!r} does not resolve ({reason}); "
            "pass process 0's host name or IP address"
        ) from None
    return host, port


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Clock:
    """Seconds since the start, against a deadline; ``due()`` is true once per ``every`` seconds."""

    def __init__(self, timeout: float, every: float):
        self.start, self.timeout, self.every = time.monotonic(), timeout, every
        self._next = every

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.timeout - self.elapsed()

    def due(self) -> bool:
        if self.elapsed() < self._next:
            return False
        self._next = self.elapsed() + self.every
        return True

    def of(self) -> str:
        return f"{self.elapsed():.0f}s of {self.timeout:.0f}s"


def _listen(port: int, address: str) -> socket.socket:
    try:
        if socket.has_dualstack_ipv6():
            return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        return socket.create_server(("", port))
    except OSError as e:
        raise JaxindError(
            f"process 0 cannot listen on port {port} of --coordinator_address={address} ({e.strerror}): "
            "another program holds it; choose another port"
        ) from None


def _greet(conn: socket.socket, num_processes: int, joined: dict[int, socket.socket]) -> None:
    """Reads a newcomer's hello; keeps it in ``joined`` or answers why not and closes it."""
    try:
        conn.settimeout(5.0)
        words = _line(conn).split()
        conn.settimeout(None)
        pid, n = int(words[2]), int(words[3])
    except (OSError, ValueError, IndexError):
        words = []
    if words[:2] != _HELLO.split():
        conn.close()  # not a jaxind process (a port scanner, another program)
        return
    problem = None
    if n != num_processes:
        problem = f"--num_processes={n} here but {num_processes} on process 0"
    elif pid in joined or not 0 < pid < num_processes:
        problem = f"--process_id={pid} is taken by another process, or not one of 1..{num_processes - 1}"
    if problem:
        conn.sendall(f"refuse {problem}\n".encode())
        conn.close()
    else:
        joined[pid] = conn


def _line(conn: socket.socket) -> str:
    """One line from ``conn`` (up to 1 KiB; "" where it closed first), within the socket's timeout."""
    data = b""
    while not data.endswith(b"\n") and len(data) < 1024:
        chunk = conn.recv(1024 - len(data))
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace")


def _dropped(joined: dict[int, socket.socket]) -> None:
    """Forgets processes whose connection closed (they died or were stopped) while waiting."""
    ready, _, _ = select.select(list(joined.values()), [], [], 0)
    for pid, conn in list(joined.items()):
        try:
            gone = conn in ready and not conn.recv(64)
        except OSError:
            gone = True
        if gone:
            conn.close()
            del joined[pid]
            _say(f"jaxind: process {pid} left before the start")


def host(address: str, num_processes: int, timeout: float, every: float = 10.0) -> None:
    """Process 0: waits until the other ``num_processes - 1`` processes have connected, saying every ``every``
    seconds which ones are missing, then lets them all go.

    Raises:
      JaxindError: some are missing after ``timeout`` seconds (the line names them), or the port is taken.
    """
    _, port = parse_address(address)
    clock, joined = _Clock(timeout, every), dict[int, socket.socket]()
    server = _listen(port, address)
    try:
        while len(joined) < num_processes - 1:
            missing = [p for p in range(1, num_processes) if p not in joined]
            if clock.left() <= 0:
                raise JaxindError(
                    f"{len(missing)} of {num_processes} processes (process id {', '.join(map(str, missing))}) did "
                    f"not reach process 0 at {address} within --distributed_timeout={timeout:.0f}s: start the same "
                    "command on each with its --process_id and this --coordinator_address, or check the network"
                )
            if clock.due():
                _say(
                    f"jaxind: waiting for {len(missing)} of {num_processes} processes (process id "
                    f"{', '.join(map(str, missing))}) at {address}, {clock.of()}"
                )
            if select.select([server], [], [], min(_RETRY_S, max(clock.left(), 0)))[0]:
                _greet(server.accept()[0], num_processes, joined)
            _dropped(joined)
        for conn in joined.values():
            conn.sendall(b"go\n")
        for conn in joined.values():  # they close first: the port is not left in TIME_WAIT for JAX
            conn.settimeout(5.0)
            try:
                conn.recv(64)
            except OSError:
                pass
            conn.close()
    finally:
        for conn in joined.values():
            conn.close()
        server.close()


def _connect(address: str, hello: str, clock: _Clock) -> socket.socket | None:
    """One try to reach process 0 and say hello; None where it is not listening (yet)."""
    host_name, port = parse_address(address)
    try:
        conn = socket.create_connection((host_name, port), timeout=max(min(5.0, clock.left()), 0.1))
        conn.sendall(hello.encode())
        return conn
    except socket.gaierror as e:
        raise JaxindError(f"--coordinator_address={address}: host does not resolve ({e.strerror})") from None
    except OSError:
        return None


def join(address: str, num_processes: int, process_id: int, timeout: float, every: float = 10.0) -> None:
    """Process ``process_id`` > 0: connects to process 0 and waits for its ``go``, saying every ``every``
    seconds what it waits for.

    Raises:
      JaxindError: no ``go`` within ``timeout`` seconds, or process 0 refused this process.
    """
    clock, hello = _Clock(timeout, every), f"{_HELLO} {process_id} {num_processes}\n"
    conn = None
    while clock.left() > 0:
        if clock.due():
            what = "the other processes" if conn else "process 0 to listen"
            _say(f"jaxind: process {process_id} waiting for {what} at {address}, {clock.of()}")
        if conn is None:
            conn = _connect(address, hello, clock)
            if conn is None:
                time.sleep(min(_RETRY_S, max(clock.left(), 0)))
            continue
        if not select.select([conn], [], [], max(min(_RETRY_S, clock.left()), 0))[0]:
            continue
        conn.settimeout(5.0)
        try:
            line = _line(conn)
        except OSError:
            line = ""
        if line.startswith("refuse "):
            raise JaxindError(f"process 0 at {address} refused this process: {line[7:].strip()}")
        conn.close()
        if line.strip() == "go":
            return
        if line:
            raise JaxindError(f"{address} answered, but not as jaxind's process 0: is another program on that port?")
        conn = None  # process 0 went away: try again
    raise JaxindError(
        f"process {process_id} of {num_processes}: process 0 at {address} did not "
        + ("start the run" if conn else "answer")
        + f" within --distributed_timeout={timeout:.0f}s: start process 0 (--process_id=0) with this "
        "--coordinator_address, or check the address and the network"
    )


class Watchdog:
    """Ends the process with one ``error:`` line (exit 1) unless :meth:`Watchdog.done` is called within ``timeout``
    seconds; says every ``every`` seconds that it is still waiting. For calls that block in C++."""

    def __init__(self, timeout: float, waiting: str, failed: str, every: float = 10.0):
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(timeout, waiting, failed, every), daemon=True)
        self._thread.start()

    def _watch(self, timeout: float, waiting: str, failed: str, every: float) -> None:
        clock = _Clock(timeout, every)
        while not self._finished.wait(min(every, max(clock.left(), 0))):
            if clock.left() <= 0:
                print(f"error: {failed}", file=sys.stderr, flush=True)
                os._exit(1)
            _say(f"jaxind: {waiting}, {clock.of()}")

    def done(self) -> None:
        self._finished.set()


def bounded(call: Callable[[], None], timeout: float, waiting: str, failed: str) -> None:
    """Runs ``call`` under a :class:`Watchdog`."""
    dog = Watchdog(timeout, waiting, failed)
    try:
        call()
    finally:
        dog.done()
