"""``python -m oasst_jax.sample``: the command lives in :mod:`oasst_jax.cli.sample`."""

if __name__ == "__main__":
    from oasst_jax.cli.sample import main

    main()
