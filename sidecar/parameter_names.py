"""The names a rule may use between percent signs (``%name%``), and where each value comes from.

Apart from the map stage (``sidecar.parameters``, which re-exports them and loads the
certificate parser) so that the admin script's shell completion offers them without loading
more than this: it answers every Tab within 100 ms.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["HEADER_PREFIX", "PARAMETERS", "STORED_PREFIX"]

PARAMETERS: Mapping[str, str] = MappingProxyType({
    "username": ("JWT claim (default sub) if the request has one, else identity header (default "
                 "x-safous-username); for a TCP connection, the client certificate's CN (--connection-username)"),
    "internal_addr": "destination address Envoy saw, ip:port ([v6]:port)",
    "user_agent": "the user-agent request header",
    "remote_ip": "source IP address Envoy saw",
    "cert_thumbprint": "SHA-1 of the client certificate's DER, lower-case hex",
    "cert_thumbprint_upper": "SHA-1 of the client certificate's DER, upper-case hex",
    "cert_thumbprint_256": "SHA-256 of the client certificate's DER, lower-case hex",
    "cert_thumbprint_256_upper": "SHA-256 of the client certificate's DER, upper-case hex",
    "cert_name": "common name (CN) of the client certificate's subject",
    "cert_alt_name": "client certificate's subject alternative names (DNS, IP, URI, e-mail), comma-separated",
    "device_id": "device header (default x-safous-device-id)",
    "groups": "group ids, comma-separated: JWT claim (default groups), else header (default x-safous-groups)",
    "group_names": ("group names, comma-separated: JWT claim (default group_names), "
                    "else header (default x-safous-group-names)"),
})
"""Every fixed parameter name, with where its value comes from (the admin script's ``params``)."""

HEADER_PREFIX = "headers."
"""``%headers.XYZ%``: the value of request header ``XYZ`` (case-insensitive), "" if absent."""

STORED_PREFIX = "stored."
"""``%stored.NAME%``: a value kept by a ``store`` response action of an earlier rule of the
same policy; resolved by the rule evaluator, not by ``Parameters.lookup``."""
