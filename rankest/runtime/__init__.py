"""How a run executes: processes (:mod:`~rankest.runtime.distributed`), memory budgets
(:mod:`~rankest.runtime.memory`) and the run skeleton every command shares (:mod:`~rankest.runtime.run`)."""
