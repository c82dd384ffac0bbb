"""Meta-test: regularised policy optimisation under a frozen reward on a new domain (metatest), and sampling from the
aligned policy (generate)."""
