"""Scraping a Prometheus endpoint in tests: one GET, parsed by prometheus_client's own parser."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

DEADLINE_S = 10.0


async def get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, str]:
    """One request to loopback `port` (the connection closed after it): status and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
        async with asyncio.timeout(DEADLINE_S):
            data = await reader.read()
    finally:
        writer.close()
    if not data:
        raise ConnectionError(f"port {port} closed the connection without an answer")
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


class Families:
    """The families of one scrape, by name (a counter's name without `_total`)."""

    def __init__(self, text: str) -> None:
        self.by_name = {f.name: f for f in text_string_to_metric_families(text)}

    def type(self, name: str) -> str:
        return self.by_name[name].type

    def samples(self, name: str, sample: str | None = None, **labels: str) -> list[Sample]:
        """The samples of family `name` called `sample` (default: the family's own value)
        whose labels include `labels`."""
        wanted = sample or (name + "_total" if self.type(name) == "counter" else name)
        return [s for s in self.by_name[name].samples
                if s.name == wanted and labels.items() <= s.labels.items()]

    def value(self, name: str, sample: str | None = None, **labels: str) -> float:
        """The sum of the matching samples' values (0 when none match)."""
        return sum(s.value for s in self.samples(name, sample, **labels))


async def scrape(port: int) -> Families:
    status, body = await get(port)
    assert status == 200, (status, body)
    return Families(body)
