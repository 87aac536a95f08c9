"""``python -m oasst_jax.pretokenize``: the command lives in :mod:`oasst_jax.cli.pretokenize`."""

if __name__ == "__main__":
    from oasst_jax.cli.pretokenize import main

    main()
