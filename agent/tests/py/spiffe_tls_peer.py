"""mTLS between workloads with the real PyPI `spiffe-tls` package, SVIDs from the Workload API
named by SPIFFE_ENDPOINT_SOCKET. Used by agent/tests/t65_spiffe_tls.rs.

  spiffe_tls_peer.py server ALLOWED_CLIENT_ID CONNECTIONS
      listens on 127.0.0.1 (mTLS, only ALLOWED_CLIENT_ID authorized); prints {"port", "id"} and then
      one JSON line per connection: {"accepted": peer_id} or {"refused": error}.
  spiffe_tls_peer.py client SERVER_ID HOST:PORT
      dials (the server must be SERVER_ID), sends "ping", prints {"id", "ok", "reply"|"error"}.
"""

import json
import sys

from cryptography import x509
from spiffe import SpiffeId, X509Source
from spiffetls import ListenOptions, ServerTlsMode, dial, listen
from spiffetls.tlsconfig.authorize import authorize_id


def out(obj):
    print(json.dumps(obj), flush=True)


def peer_id(conn):
    cert = conn.get_peer_certificate().to_cryptography()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)[0]


def server(source, allowed, count):
    options = ListenOptions(
        tls_mode=ServerTlsMode.MTLS, authorize_fn=authorize_id(SpiffeId(allowed))
    )
    listener = listen("127.0.0.1:0", source, options)
    out({"port": listener.getsockname()[1], "id": str(source.svid.spiffe_id)})
    for _ in range(count):
        conn, _ = listener.accept()
        try:
            conn.do_handshake()
            peer = peer_id(conn)
            conn.recv(1024)
            conn.sendall(("hello " + peer).encode())
            conn.shutdown()
            out({"accepted": peer})
        except Exception as e:  # noqa: BLE001 - the refusal is the result
            out({"refused": repr(e)})
        finally:
            conn.close()


def client(source, server_id, address):
    own = str(source.svid.spiffe_id)
    try:
        conn = dial(address, source, authorize_fn=authorize_id(SpiffeId(server_id)))
        conn.sendall(b"ping")
        reply = conn.recv(1024).decode()
        conn.close()
        out({"id": own, "ok": bool(reply), "reply": reply})
    except Exception as e:  # noqa: BLE001 - the refusal is the result
        out({"id": own, "ok": False, "error": repr(e)})


def main():
    source = X509Source(timeout_in_seconds=10)
    try:
        if sys.argv[1] == "server":
            server(source, sys.argv[2], int(sys.argv[3]))
        else:
            client(source, sys.argv[2], sys.argv[3])
    finally:
        source.close()


if __name__ == "__main__":
    main()
