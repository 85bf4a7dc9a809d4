"""The workers' HTTP client: the test httpcore makes before reusing an idle keep-alive connection,
including under gevent, where the worker runs and where it is answered without gevent's hub."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

from imagegate.workers.http import socket_readable


def test_an_idle_connection_is_not_readable_until_its_peer_sends_or_closes():
    mine, theirs = socket.socketpair()
    try:
        assert socket_readable(mine) is False
        theirs.sendall(b"x")
        assert socket_readable(mine) is True
        mine.recv(1)
        theirs.close()
        assert socket_readable(mine) is True  # the next read returns b"": closed by the peer
    finally:
        mine.close()
    assert socket_readable(mine) is True  # gone: treated as closed
    assert socket_readable(None) is True


# Two upstreams: one keeps its connections alive, one closes each after its answer. Under gevent the
# client reuses the first's connection (one connection for every request) and never the second's
# closed one (every request answered).
_GEVENT_WORKER = textwrap.dedent(
    """
    from gevent import monkey
    monkey.patch_all()
    import socket, threading, time
    from imagegate.workers.http import check_idle_connections_without_the_hub, make_client

    ANSWER = b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok"

    def upstream(keep_alive):
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        accepted = []

        def serve(connection):
            while connection.recv(65536):
                connection.sendall(ANSWER)
                if not keep_alive:
                    break
            connection.close()

        def accept_forever():
            while True:
                connection, _ = server.accept()
                accepted.append(connection)
                threading.Thread(target=serve, args=(connection,), daemon=True).start()

        threading.Thread(target=accept_forever, daemon=True).start()
        return "http://127.0.0.1:%d/" % server.getsockname()[1], accepted

    check_idle_connections_without_the_hub()  # as the worker does at start
    client = make_client(max_connections=32)  # one pool: reuse is visible
    for keep_alive in (True, False):
        url, accepted = upstream(keep_alive)
        for _ in range(3):
            assert client.get(url).text == "ok"
            time.sleep(0.05)
        print("keep_alive=%s connections=%d" % (keep_alive, len(accepted)))
    """
)


def test_under_gevent_an_idle_connection_is_reused_unless_the_upstream_closed_it():
    done = subprocess.run([sys.executable, "-c", _GEVENT_WORKER], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "keep_alive=True connections=1" in done.stdout
    assert "keep_alive=False connections=3" in done.stdout
