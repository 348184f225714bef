"""Quality checks that decide whether a cheap-tier answer is good enough to keep.

A failed check is what triggers escalation to a more expensive tier, so every
check here is a trade-off between catching bad answers and paying for needless
escalations. That is why the checks are lenient about harmless formatting
(quotes around a label, a ```json fence) but strict about anything a downstream
consumer would choke on (prose around JSON, truncated output).

Specs arrive in job input, which is untrusted: nothing in a spec can name code
to import (custom checks are looked up by name in an operator-supplied mapping),
and the patterns and schemas a spec carries are made safe in one place,
`batchroute.validators.safety` (RE2 patterns, schemas resolved only within
themselves, depth and size limits).

Every check judges one completion. The `consensus` check reads all the choices
of that completion (the pipeline asks for ``n = k`` of them, see
`batchroute.consensus`). The `scorer` check also reads the request (its last user
message): a learned P(answer correct | prompt, answer) that `batchroute calibrate`
fits and writes as a JSON weight file (`batchroute.scorer`). Any spec may carry
``"tiers": [1, 2]`` to run only on attempts at those tiers (see `specs_for_tier`): a
check whose only effect is to escalate is pointless, and costly, at the top of a ladder.

Modules: `base` (Verdict, errors, protocol), `params` (reading specs), `safety`
(patterns, schemas, nesting), `checks` and `callables` (the checks), `build`
(specs to checks), `run` (running them).
"""

from __future__ import annotations

from batchroute.validators.base import Validator, ValidatorError, Verdict
from batchroute.validators.build import (
    _KNOWN_PARAMS,
    PIPELINE_TYPES,
    VALIDATOR_TYPES,
    build_for_run,
    build_validators,
    specs_for_tier,
    validate_specs,
    validators_for_response_format,
)
from batchroute.validators.run import failure_reason, passed, run_validators

__all__ = [
    "PIPELINE_TYPES",
    "VALIDATOR_TYPES",
    "Validator",
    "ValidatorError",
    "Verdict",
    "_KNOWN_PARAMS",
    "build_for_run",
    "build_validators",
    "failure_reason",
    "passed",
    "run_validators",
    "specs_for_tier",
    "validate_specs",
    "validators_for_response_format",
]
