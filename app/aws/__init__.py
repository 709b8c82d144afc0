"""Talking to AWS: credentials, SigV4 signing, the one HTTP client, the endpoint, the
per-action quotas, and what AWS's answers mean (``classify``, ``health``)."""
