"""Talking to AWS: credentials, signing, endpoint, the JSON 1.1 protocol and the backend."""
