"""Expert parallelism for the new routers: EP=2 equals EP=1 (the checks of test_expert_parallel)."""
import pytest
from dist_utils import run_workers

CASES = {
    "expert-choice": dict(router="expert_choice", capacity_factor_train=1.0, capacity_factor_eval=1.0),
    # threshold 1.0: every second copy unsent, so EP must skip them in its counts and exchange
    "top2-threshold": dict(router="topk", top_k=2, second_policy="random", second_threshold=1.0,
                           capacity_factor_train=1.0),
}


def _worker(rank, world, case):
    import test_expert_parallel as tep  # its worker reads the case from its own table

    tep.CASES[case] = CASES[case]
    tep._ep_vs_local(rank, world, case)


@pytest.mark.parametrize("case", list(CASES))
def test_ep2_equals_ep1_for_new_routers(case):
    run_workers(_worker, 2, case, timeout=120)
