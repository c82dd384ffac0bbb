"""Models: where they come from (sources), devices and precision, the policy and its reference, the reward model,
tokens and sampling, the frozen trunk, chat templates, exported artefacts, tiny test models."""
