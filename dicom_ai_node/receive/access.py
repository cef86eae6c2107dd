"""Which source addresses a calling AE title may associate from (``[dicom] allowed_addresses``).

An AE title is only a name that the peer chooses (PS3.8 Section 9.3.2, Calling AE Title):
binding it to the addresses of the machines that really use it keeps another host on the
network from sending (or probing) under that name. Addresses are compared as IP networks;
an IPv4 peer seen on a dual-stack listener (``::ffff:10.0.0.5``) counts as its IPv4 address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ANY_AE = "*"


class AddressPolicy:
    """``allowed[ae_title]`` lists the networks that AE title may come from; ``allowed["*"]``
    those of the AE titles not listed. An AE title with no entry (and no ``"*"``) may come
    from anywhere."""

    def __init__(self, allowed: Mapping[str, Sequence[str]]) -> None:
        self._allowed: dict[str, list[IPNetwork]] = {
            ae.strip(): [ipaddress.ip_network(n, strict=False) for n in networks]
            for ae, networks in allowed.items()
        }

    def __bool__(self) -> bool:
        return bool(self._allowed)

    def may_connect(self, address: str) -> bool:
        """Whether any AE title may associate from ``address``: checked when the TCP
        connection is accepted, before anything is read from it."""
        if ANY_AE not in self._allowed:
            return True
        ip = _ip(address)
        return ip is not None and any(
            ip in network for networks in self._allowed.values() for network in networks
        )

    def allows(self, calling_ae_title: str, address: str) -> bool:
        """Whether ``calling_ae_title`` may associate from ``address``."""
        networks = self._allowed.get(calling_ae_title.strip(), self._allowed.get(ANY_AE))
        if networks is None:
            return True
        ip = _ip(address)
        return ip is not None and any(ip in network for network in networks)


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address as an IP address (an IPv4-mapped IPv6 one as IPv4); ``None`` if invalid."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
