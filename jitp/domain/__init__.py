"""Domain values and pure rules: records and their lifecycle, identities, events, topic ACL, enrollment templates, routing state, audit entries."""
