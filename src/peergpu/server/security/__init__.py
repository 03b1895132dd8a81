"""Credentials: password hashing, access tokens, opaque tokens and API keys."""
