"""Reports a person reads: report.md and PNG plots of an estimate (:mod:`~rankest.report.estimate`,
:mod:`~rankest.report.plots`), comparisons (:mod:`~rankest.report.compare`), n-gram sections
(:mod:`~rankest.report.ngram`), heads and diagnostics reports."""
