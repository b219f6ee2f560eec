"""Files rankest reads and writes: atomic writes and the JSON policy (:mod:`~rankest.io.files`),
results (:mod:`~rankest.io.results`, :mod:`~rankest.io.spectrum_file`), checkpoints
(:mod:`~rankest.io.checkpoint`), the row cache (:mod:`~rankest.io.rowcache`) and the results of
checkpoint sweeps (:mod:`~rankest.io.sweep_results`)."""
