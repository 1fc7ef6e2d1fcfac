"""Recipes: one per command, each reading setup -> train -> evaluate -> report.

``run`` (a classification stream through the learner and an expansion strategy), ``lm`` (continual language
modelling) and ``uptrain`` (uptraining recursive models) are peers: none imports another, and what they share (seeding,
devices, the schedule, the training loop, run folders) lives in the training kit, :mod:`continual.training`.

Nothing is imported here, so that ``continual --help`` and ``continual list`` stay cheap.
"""
