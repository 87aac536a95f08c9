"""``python -m oasst_jax.plot``: the command lives in :mod:`oasst_jax.cli.plot`."""

if __name__ == "__main__":
    from oasst_jax.cli.plot import main

    main()
