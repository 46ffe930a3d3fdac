"""The base of MoEConfig's option groups: each group declares its fields and checks them itself.

MoEConfig (vitmoe.moe.config) inherits every group, so a router's option is a field of the group
in the router's own file, checked there, read there: adding one is a one-file change, and it is
still spelled flat in YAML and on the command line (`model.moe.second_policy=sampling`).
It sits here, below the routers that subclass it and the group registry in base.py, so that
vitmoe.moe (MoEConfig, ExpertOptions in experts.py) imports the routers and never the reverse.
"""
from __future__ import annotations

from typing import Sequence

from ...validation import Fields


class Options:
    # The group's fields are read by name from the whole MoEConfig (e.g. `self.router`).
    router: str
    top_k: int

    def check(self, f: Fields, experts: Sequence[int]) -> None:
        """Check (and coerce) this group's fields; `experts`: the expert count of every MoE layer.
        Groups chain with super(), so MoEConfig.check runs every group's checks."""
