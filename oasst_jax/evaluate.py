"""``python -m oasst_jax.evaluate``: the command lives in :mod:`oasst_jax.cli.evaluate`."""

if __name__ == "__main__":
    from oasst_jax.cli.evaluate import main

    main()
