"""``python -m oasst_jax.convert``: the command lives in :mod:`oasst_jax.cli.convert`."""

if __name__ == "__main__":
    from oasst_jax.cli.convert import main

    main()
