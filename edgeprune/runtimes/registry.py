"""The adapter registry: a device URL's scheme → the factory that opens its adapter.

Each adapter module registers itself with ``@register_adapter``; the ``edgeprune.runtimes``
package imports every built-in adapter, and Python runs the package before any of its
modules, so the registry is full whenever ``open_adapter`` can be called.
"""

from __future__ import annotations

from collections.abc import Callable

from edgeprune.errors import DeviceError
from edgeprune.runtimes.base import BenchSettings, DeviceUrl, RuntimeAdapter, parse_device_url

AdapterFactory = Callable[[DeviceUrl, BenchSettings], RuntimeAdapter]
ADAPTER_FACTORIES: dict[str, AdapterFactory] = {}


def register_adapter(scheme: str) -> Callable[[AdapterFactory], AdapterFactory]:
    """Decorator: make ``open_adapter`` build ``scheme`` devices with the factory."""

    def register(factory: AdapterFactory) -> AdapterFactory:
        ADAPTER_FACTORIES[scheme] = factory
        return factory

    return register


def open_adapter(device: str, settings: BenchSettings | None = None) -> RuntimeAdapter:
    """The adapter for a device URL; ``settings`` bound the preparation (timeouts, retries).

    Raises:
        DeviceError: unknown scheme or a malformed URL (nothing is contacted yet).
    """
    url = parse_device_url(device)
    factory = ADAPTER_FACTORIES.get(url.scheme)
    if factory is None:
        known = ", ".join(sorted(ADAPTER_FACTORIES))
        raise DeviceError(f"unknown device {device!r}: use one of {known} (e.g. ssh://pi@host, adb://SERIAL)")
    return factory(url, settings or BenchSettings())
