"""Pure computation: model spec -> module inventory -> memory per component -> decision.

No printing, no GPU, no network in this package.
"""
