"""The rule set as one document: its format, the checks of every rule and policy, and the plan
of an import. The admin script (``export``, ``import``, ``rule``/``policy`` commands, ``bundle
build``) and the sidecar applying a bundle both use it, so what one refuses the other refuses;
it imports neither of them.

    _document.py    the document (``export_document``), secrets masked in it (``redacted``)
    _validation.py  a rule or policy checked as the sidecar will use it, one line per refusal
    _plan.py        an import checked whole (``plan_import``), then written (``apply_import``)

Exceptions::

    Exception
     └── InvalidContent   a rule, policy or document refused; the message is one line naming
                          the object and the problem
"""

from ._document import FORMAT_VERSION, export_document, masked_headers, policy_document, redacted, rule_document
from ._plan import ImportPlan, apply_import, plan_import
from ._validation import (
    InvalidContent,
    check_name,
    check_secrets,
    closest,
    quoted,
    stored_problem,
    stored_problems,
    validate_policy,
    validate_rule,
)

__all__ = [
    "FORMAT_VERSION",
    "ImportPlan",
    "InvalidContent",
    "apply_import",
    "check_name",
    "check_secrets",
    "closest",
    "export_document",
    "masked_headers",
    "plan_import",
    "policy_document",
    "quoted",
    "redacted",
    "rule_document",
    "stored_problem",
    "stored_problems",
    "validate_policy",
    "validate_rule",
]
