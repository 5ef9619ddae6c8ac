from __future__ import annotations

from controller.placement import AgentView, Request, choose, never_fits


def agents() -> list[AgentView]:
    return [AgentView("big", 8000, 32000, gpus=2, used_cpu=4000, used_memory=1000),
            AgentView("small", 2000, 4000, used_cpu=0, used_memory=0)]


def test_spread_prefers_the_least_loaded_and_binpack_the_most() -> None:
    req = Request(1000, 1000)
    assert choose(req, agents()).name == "small"  # type: ignore[union-attr]
    assert choose(req, agents(), strategy="binpack").name == "big"  # type: ignore[union-attr]


def test_filters() -> None:
    pool = agents()
    assert choose(Request(3000, 100), pool).name == "big"  # type: ignore[union-attr]
    assert choose(Request(3000, 100, gpus=3), pool) is None
    assert choose(Request(100, 100, gpus=1), pool).name == "big"  # type: ignore[union-attr]
    pool[0].draining = True
    assert choose(Request(3000, 100), pool) is None
    pool[1].labels = {"zone": "a"}
    assert choose(Request(100, 100), pool, selector={"zone": "a"}).name == "small"  # type: ignore[union-attr]
    assert choose(Request(100, 100), pool, selector={"zone": "b"}) is None


def test_jobs_that_could_never_fit_are_explained() -> None:
    pool = agents()
    assert never_fits(Request(1000, 1000), pool) is None
    assert "number_of_workers=2" in (never_fits(Request(1000, 1000, workers=2), pool) or "")
    assert "3 GPU" in (never_fits(Request(100, 100, gpus=3), pool) or "").replace(
        "gpu_limit=3", "3 GPU")
    assert "cpu_limit=9000" in (never_fits(Request(9000, 100), pool) or "")
    assert "memory_limit=64000" in (never_fits(Request(100, 64000), pool) or "")
    assert never_fits(Request(10**6, 10**6), []) is None  # nobody known yet: wait
