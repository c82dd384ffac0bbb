"""The bilevel core of method.md: objectives (plain tensor functions), the KL-regularised RLOO step shared by the inner
loop and the meta-test (policy_opt), the bilevel step and its hypergradient (bilevel), and the leverage measures."""
