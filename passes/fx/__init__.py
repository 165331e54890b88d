"""graphsurg.passes.fx -- the torch.fx IR adapter, one room per concern.

* :mod:`.adapter` -- ``TorchAdapter``: the spine's verbs (observe, run, snapshot, restore,
  target, save) for an ``nn.Module``.
* :mod:`.capture` and :mod:`.instrument` -- capture a model as a graph, find its sites,
  insert observer nodes (``measurements_from`` turns them into ``Measurements``).
* :mod:`.target` -- the torch ``Target`` the library's torch appliers edit.
* :mod:`.coupling` -- which dimensions are bound to a layer's units (one handler per op).
* :mod:`.rewrite` and :mod:`.lift_modules` -- graph rewrites as ``torch.fx`` passes
  (``PassBase.call(gm) -> PassResult(gm, modified)``).
* :mod:`.backend`, :mod:`.observe_compiled`, :mod:`.dynamo_sites`, :mod:`.apply_plan` -- the
  ``graphsurg`` torch.compile backend: a plan's rewrites and the monitor's observation of
  Dynamo graphs (through the public ``MonitorSink``).

Nothing is imported here: ``import graphsurg.passes.fx.backend`` (what torch.compile's entry
point does) loads only what it needs. Modules here import the kernels, the data model and each
other, never the planner, operate, verify, library, detect or the ``graphsurg`` facade
(tests/packaging/test_layering.py).
"""
