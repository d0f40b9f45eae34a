"""The application layer: the provisioning service, the operations table, admission control."""
