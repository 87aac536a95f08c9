"""``python -m oasst_jax.train``: the command lives in :mod:`oasst_jax.cli.train`."""

if __name__ == "__main__":
    from oasst_jax.cli.train import main

    main()
