"""The planner's parts (``python -m oasst_jax.plan``): chip table and GPU targets (``chips``),
analytic memory (``memory``, ``lora``) and time (``timing``) models, layout ``search``, and
the ahead-of-time compile of the real step (``aot``)."""
