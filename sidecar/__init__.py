"""Safous ZTNA webhook rules as an Envoy ext_authz sidecar.

The request path, one module a stage:

    edge.read_request      CheckRequest  -> RequestAttributes   (protobuf only here and in edge)
    parameters.map_parameters  RequestAttributes -> Parameters  (pure)
    policies.PolicyIndex.match  host/path/method -> Policy | None
    rules.RuleEvaluator.evaluate  Policy + Parameters -> Decision     (the sidecar.rules package)
    edge.build_response    Decision -> CheckResponse
    activity.ActivityLog.record  Decision -> rules.db (sidecar.db), off the request path

check.Checker strings the stages together; server.py hosts it behind grpc.aio.
"""

__version__ = "0.2.0.dev0"
