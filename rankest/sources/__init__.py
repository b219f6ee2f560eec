"""Where rows come from: corpora (:mod:`~rankest.sources.corpus`), row plans
(:mod:`~rankest.sources.rows`), teachers (:mod:`~rankest.sources.teachers`) and their
checkpoints (:mod:`~rankest.sources.revisions`), offline tokenizers
(:mod:`~rankest.sources.tokenizers`), files of logits (:mod:`~rankest.sources.logits_file`) and
assets of installed packages (:mod:`~rankest.sources.assets`)."""
