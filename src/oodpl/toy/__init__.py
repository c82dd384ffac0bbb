"""The toy problem of method.md (tabular softmax policy, linear reward: closed forms for every quantity) and the
convergence experiment for the paper's theorem."""
