"""What crosses the wire between the host agent and the server.

Imported by both sides; imports nothing else of ours. ``messages`` holds the versioned message
models, ``manifest`` the signed job manifest (Ed25519).
"""

from peergpu.protocol.messages import (
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    AgentMessage,
    ServerMessage,
    negotiate_version,
    parse_agent_message,
    parse_server_message,
)

__all__ = [
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "AgentMessage",
    "ServerMessage",
    "negotiate_version",
    "parse_agent_message",
    "parse_server_message",
]
