"""The rectification engine: one GRU step, composed (see ``docs/design.md``).

:class:`~gru_optim.engine._engine.Engine` owns the retain memory, the rule, the
partition, the reducer, the AMP boundary and the statistics, and runs the retain side and
the forget side over a gradient source (:mod:`gru_optim.engine._sources`): the ``.grad``
of a torch optimizer's parameters, or DeepSpeed's partitioned gradients. Its pieces, one
module each: ``_memory`` (the memory), ``_partition`` (segments), ``_reduce`` (the one
packed all-reduce), ``_amp`` (gradient scaling), ``_stats`` (``last_stats``), ``_pending``
(what a retain side leaves for its step), ``_spaces`` (gradient or update space),
``_groups`` (hyperparameters in the parameter groups), ``_inner`` (the inner optimizer's
step), ``_state_dict`` and ``_fragments`` (checkpoints), ``_config`` (the keywords every
driver shares), ``_sources``, ``_param_sides`` (the ``.grad`` driver) and ``_fragment_sides``
(a driver's own flat fragments, DeepSpeed's), ``_build``
(``GRUOptimizer``'s engine, built) and ``_policy`` (plain steps, one wrapper per inner
optimizer).

Imports go one way: the drivers import the engine, the engine imports the rules and the
functional core, the rules import the functional core only. This ``__init__`` imports
nothing (import the modules themselves).
"""
