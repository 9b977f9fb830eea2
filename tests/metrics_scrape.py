"""Reading a plane's Prometheus endpoint in tests: one scrape, parsed with
prometheus_client's own parser into {(name, labels): value}."""

from __future__ import annotations

import urllib.request

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(listen: str) -> Samples:
    """GET http://<listen>/metrics (host:port), parsed."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{listen}/metrics") as response,
    ):
        assert response.status == 200
        return parse(await response.text())


def scrape_blocking(listen: str) -> Samples:
    """scrape() for code outside an event loop."""
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as answer:
        return parse(answer.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample `name` with exactly these labels; 0 when absent."""
    return samples.get((name, frozenset(labels.items())), 0.0)
