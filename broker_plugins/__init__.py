"""Thin amqtt adapters for jitp: the hardened broker, auth, topic ACL and event plugins.

Everything that depends on amqtt internals lives in :mod:`broker_plugins.hardened`.
"""
