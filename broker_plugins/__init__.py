"""The amqtt adapter of jitp. It depends on the core (``jitp``); nothing in the core depends on it.

- ``server``: assembles a node (registry, provisioning service, TLS, listener, broker, publisher).
- ``listener`` and ``tls``: accepting sockets and the mutual-TLS handshake (W1, W6).
- ``broker``: the connection path (admission, will, takeover) and routing (topic tree, queues,
  retained quotas); ``handler``: one connection's packets; ``session``: typed per-session state;
  ``enforcement``: keep-alive and will checks; ``framing``: packet limits and bounded writes.
- ``admin``: the MQTT admin API; ``publisher``: the outbox publisher (events, device configs).
- ``compat``: the amqtt pin, the internals relied on, and the index of workarounds W1-W17.
"""
