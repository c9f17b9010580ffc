"""A stand-in for `engine.ensemble.Member` in head-training tests: a member without a backbone."""

from types import SimpleNamespace

from axx_backend.engine.ensemble import Member


class HeadOnlyMember(SimpleNamespace):
    """`name`, `head` and `temperature`, with Member's own `mc_probs` and `device`: all that head training reads."""

    mc_probs = Member.mc_probs
    device = Member.device
