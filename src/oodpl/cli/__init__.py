"""The `oodpl` command line (main), a thin layer over the stages; `python -m oodpl.cli` is the `oodpl` command."""
