"""continual: continual learning on pretrained transformers by expansion.

The Python entry points mirror the command line (``continual run``, ``resume``, ``eval``, ``predict``); heavy
libraries are imported only when one is called::

    import continual
    run = continual.load_run("outputs/standard-order1/delta-minilm-taskhead-seed0")
    run.predict(["A thrilling match in the final minute."])
"""

__version__ = "0.1.0"


def load_run(run_dir, overrides=(), previous: bool = False):
    """Rebuild a run's trained model from its folder: ``.predict(texts, task=None)`` and ``.evaluate()``
    (:class:`continual.recipes.saved.LoadedRun`)."""
    from continual.recipes.saved import load_run as _load

    return _load(run_dir, overrides, previous=previous)
