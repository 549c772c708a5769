"""A paho client's settings from comm_args (broker credentials, TLS) and on its socket (TCP_NODELAY): the comm
manager's client and the broker probe's are set up the same way."""

from __future__ import annotations

import logging
import socket
import ssl

import paho.mqtt.client as mqtt

from fedpeft_edge.config import CommArgs, read_password

log = logging.getLogger(__name__)


def set_nodelay(client: mqtt.Client) -> None:
    """Disable Nagle: a message's last segment and every PUBACK go out at once, not after a delayed ACK."""
    sock = client.socket()
    if isinstance(sock, (socket.socket, ssl.SSLSocket)):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # not TCP (a unix socket or websocket proxy): nothing to tune
            log.debug("TCP_NODELAY not set: %s", exc)


def apply_credentials(client: mqtt.Client, comm_args: CommArgs) -> None:
    """Broker username/password and TLS (CA, client certificate) from comm_args, on a paho client."""
    a = comm_args
    if a.username is not None:
        client.username_pw_set(a.username, read_password(a))
    if a.tls_ca_file or a.tls_cert_file:
        client.tls_set(ca_certs=a.tls_ca_file, certfile=a.tls_cert_file, keyfile=a.tls_key_file,
                       cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.tls_insecure_set(a.tls_insecure)
