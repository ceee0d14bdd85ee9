"""The varreg command line (installed as the package ``varreg_cli``)."""
