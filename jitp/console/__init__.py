"""The web console (issue 17): server-rendered HTML on the node's metrics listener.

Access by a token (``jitp console token``), authorized by the token's role through the same
operations table (and roles) as the CLI and the admin API: an auditor reads, an operator acts.
No JavaScript build, nothing fetched from elsewhere: the pages are HTML and inline SVG.
"""
