"""A minimal HTTP/1.1 client on asyncio streams: one fixed request, keep-alive.

Cheap and predictable next to a full client library: the request bytes are
built once, and an answer is read by its Content-Length (or chunks). Used by
the paced latency client and by the drained load of long calls.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Target:
    """Where to send: a base URL, a path, a method, a JSON body (or none), and
    headers besides Host, Connection, Content-Type and Content-Length."""

    url: str
    path: str
    method: str = "POST"
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = "application/json"


class Connection:
    """One keep-alive HTTP/1.1 connection that sends one fixed request again and again."""

    def __init__(self, target: Target) -> None:
        self.target = target
        parts = urlsplit(target.url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        head = [
            f"{target.method} {target.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Connection: keep-alive",
        ]
        head += [f"{name}: {value}" for name, value in target.headers]
        if target.body is not None:
            head += [f"Content-Type: {target.content_type}", f"Content-Length: {len(target.body)}"]
        self.request = ("\r\n".join(head) + "\r\n\r\n").encode() + (target.body or b"")
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        """Connect."""
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def exchange(self) -> int:
        """Send the request, read the whole answer; return its status."""
        assert self.reader is not None
        assert self.writer is not None
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if chunked:
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        elif length:
            await self.reader.readexactly(length)
        return status

    async def close(self) -> None:
        """Close the connection."""
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()
