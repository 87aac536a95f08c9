"""``python -m oasst_jax.plan``: the command lives in :mod:`oasst_jax.cli.plan`."""

if __name__ == "__main__":
    from oasst_jax.cli.plan import main

    main()
