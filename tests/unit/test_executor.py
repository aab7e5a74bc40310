"""The executor's pure parts: what a unit's task asks Ray for, and the refusal of units that
no node can hold."""

import pytest

from orchestrator.config.schema import RuntimeConfig
from orchestrator.engine.executor import check_fits, memory_request
from orchestrator.errors import PlanError
from orchestrator.planning.plan import PROCESS_BYTES, WorkUnit


def unit(index, peak):
    return WorkUnit(index, f"model-{index:05d}.safetensors", (), 0, 0, peak)


def test_memory_requests_are_the_estimate_plus_a_worker_process():
    assert memory_request(unit(0, 5 << 20)) == (5 << 20) + PROCESS_BYTES


def test_the_largest_unit_must_fit_the_largest_node():
    units = [unit(0, 1 << 30), unit(1, 3 << 30), unit(2, 2 << 30)]
    check_fits(units, [2 << 30, (3 << 30) + PROCESS_BYTES], RuntimeConfig())  # fits one node
    with pytest.raises(PlanError, match=r"work unit 1 \(output shard model-00001.safetensors\) "
                                        r"needs about 3\.3 GiB .*the largest: 3\.0 GiB"):
        check_fits(units, [2 << 30, 3 << 30], RuntimeConfig())
    check_fits(units, [], RuntimeConfig())  # a cluster that reports no memory: Ray decides
