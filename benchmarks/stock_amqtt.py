"""Stock amqtt 0.12.1 over mTLS with a minimal client-certificate check, no provisioning.

Run by ``benchmarks/join_storm.py`` as its own process (``python -m benchmarks.stock_amqtt``) so
its CPU can be read from /proc. amqtt hard-codes ``CERT_OPTIONAL``; the auth plugin below is
what makes the client certificate required: a verified peer certificate whose CN equals the
client id.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from dataclasses import dataclass

from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session


class PeerCertAuthPlugin(BaseAuthPlugin):
    """Admit a client iff it presented a (CA-verified) certificate whose CN is its client id."""

    @dataclass
    class Config:
        pass

    async def authenticate(self, *, session: Session) -> bool | None:
        ssl_object = session.ssl_object
        if ssl_object is None:
            return False
        cert = ssl_object.getpeercert()
        if not cert:
            return False
        cns = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
        return len(cns) == 1 and cns[0] == session.client_id


async def serve(port: int, certfile: str, keyfile: str, cafile: str) -> None:
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "ssl": True, "certfile": certfile,
                                  "keyfile": keyfile, "cafile": cafile}},
        "plugins": {"benchmarks.stock_amqtt.PeerCertAuthPlugin": {}},
    }
    broker = Broker(config)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--certfile", required=True)
    parser.add_argument("--keyfile", required=True)
    parser.add_argument("--cafile", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("transitions").setLevel(logging.WARNING)
    asyncio.run(serve(args.port, args.certfile, args.keyfile, args.cafile))


if __name__ == "__main__":
    main()
