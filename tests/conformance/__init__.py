"""The conformance corpus (issue 14): real architectures built offline from small configs,
healthy and with planted faults, and the checks graphsurg must pass on each.

``corpus`` builds the models, ``faults`` plants the faults and returns the planted truth,
``runner`` runs the checks and writes ``docs/conformance.md``
(``python -m tests.conformance.runner``)."""
