"""``laco bench``'s clean-measurement reporting: load per round, flagged rounds, per-round paired ratios.

Synthetic rounds with known answers: the aggregation (median and range over rounds, over unflagged
rounds, wall and CPU time) and the flagging rules, plus the round records and --max-load wait of the timer.
"""

import statistics

import pytest

from laco.bench import timers
from laco.bench.report import STARVED, analyze, paired, round_flags, to_markdown
from laco.bench.timers import Case, run_cases, summarize


def rnd(i, load=(1.0, 1.0), wall=10.0, cpu=20.0, warmup=False, over=False):
    return {"index": i, "warmup": warmup, "loadavg_start": [load[0], 0.5, 0.5], "loadavg_end": [load[1], 0.5, 0.5],
            "wall_s": wall, "cpu_s": cpu, "waited_s": 0.0, "over_max_load": over}


def test_paired_median_and_range_over_all_and_unflagged_rounds():
    base, other = [2.0, 9.0, 2.0, 3.0, 2.2], [1.0, 3.0, 1.25, 1.5, 1.0]  # ratios 2, 3, 1.6, 2, 2.2
    p = paired(base, other, [False, True, False, False, False])
    assert p["per_round"] == pytest.approx([2.0, 3.0, 1.6, 2.0, 2.2])
    assert (p["median"], p["low"], p["high"], p["n"]) == (pytest.approx(2.0), pytest.approx(1.6), pytest.approx(3.0), 5)
    u = p["unflagged"]
    assert u["n"] == 4 and u["median"] == pytest.approx(statistics.median([2.0, 1.6, 2.0, 2.2]))
    assert (u["low"], u["high"]) == (pytest.approx(1.6), pytest.approx(2.2))
    assert paired([1.0, 1.0], [0.5, 0.5], [True, True])["unflagged"] is None  # every round flagged
    assert paired([1.0, 1.0], [0.5, 0.25])["unflagged"]["n"] == 2  # no round records: nothing flagged
    with pytest.raises(ValueError, match="no per-round samples"):
        paired([], [])


def test_round_flags_load_max_load_and_cpu_starvation():
    result = {"config": {"load_threshold": 3.0}, "environment": {"device_type": "cpu"},
              "rounds": [rnd(0, load=(9.0, 9.0), warmup=True),  # warm-up: never reported
                         rnd(1), rnd(2, load=(1.0, 4.5)), rnd(3, over=True), rnd(4, cpu=20.0 * STARVED - 1),
                         rnd(5, cpu=19.0)]}
    flags = round_flags(result)
    assert len(flags) == 5
    assert flags[0] == [] and flags[4] == []  # 19/20 of the best CPU/wall is not starvation
    assert flags[1] == ["load 4.5 > 3"] and flags[2] == ["started over --max-load"]
    assert len(flags[3]) == 1 and flags[3][0].startswith("CPU/wall 1.50")
    result["environment"]["device_type"] = "cuda"  # CPU/wall means nothing when the host waits on the GPU
    assert round_flags(result)[3] == []
    assert round_flags({**result, "rounds": []}) == []


def test_analyze_reports_paired_ratios_without_flagged_rounds():
    def rec(method, part, times, cpu):
        return {"method": method, "part": part, "time": summarize(times), "cpu_time": summarize(cpu)}

    result = {
        "config": {"baseline": "laco@post", "work": {"batch_size": 1, "images_per_sample": 1, "text_tokens": 4, "new_tokens": 4},
                   "load_threshold": 3.0,
                   "vision": "v", "llm": "l", "dtype": "float32", "attn_implementation": "sdpa", "warmup": 1,
                   "repeats": 3},
        "environment": {"device_type": "cpu", "device_name": "cpu", "torch_threads": 2, "cpu_count": 2,
                        "versions": {}, "python": "3"},
        "command": "laco bench test",
        "models": {"laco@post": {"merge_layers": [4], "encoder_layers": 4, "num_image_tokens": 4,
                                 "sequence_length": 8, "params": {"compressor": 1}},
                   "laco@1": {"merge_layers": [1], "encoder_layers": 4, "num_image_tokens": 4,
                              "sequence_length": 8, "params": {"compressor": 1}}},
        "predicted": {"laco@post": {"encoder": 300}, "laco@1": {"encoder": 100}},
        # round 2 ran under load: its wall ratio is off, its CPU-time ratio is not
        "measured": [rec("laco@post", "encoder", [3.0, 9.0, 3.3], [6.0, 6.0, 6.6]),
                     rec("laco@1", "encoder", [1.5, 9.0, 1.5], [3.0, 3.0, 3.0])],
        "rounds": [rnd(0, warmup=True), rnd(1), rnd(2, load=(6.0, 6.0)), rnd(3)],
    }
    a = analyze(result)
    assert a["round_flags"] == [[], ["load 6.0 > 3"], []]
    wall = a["speedups"]["laco@1"]["encoder"]["paired"]
    assert wall["median"] == pytest.approx(2.0) and (wall["low"], wall["high"]) == (pytest.approx(1.0), pytest.approx(2.2))
    assert wall["unflagged"] == {"median": pytest.approx(2.1), "low": pytest.approx(2.0), "high": pytest.approx(2.2),
                                 "n": 2}
    cpu = a["speedups_cpu_time"]["laco@1"]["encoder"]["paired"]
    assert cpu["median"] == pytest.approx(2.0) and cpu["unflagged"]["n"] == 2
    md = to_markdown(result, a)
    assert "## Rounds: machine load" in md and "load 6.0 > 3" in md
    assert "| encoder | laco@1 | 2.00x (1.00-2.20, n=3) | 2.10x (2.00-2.20, n=2) | 2.00x (2.00-2.20, n=3) |" in md
    old = {k: v for k, v in result.items() if k != "rounds"}  # results saved before round records existed
    assert analyze(old)["speedups"]["laco@1"]["encoder"]["paired"]["unflagged"]["n"] == 3


def test_run_cases_records_every_round_and_waits_for_load(monkeypatch):
    loads = iter([5.0, 5.0, 1.0] + [1.0] * 100)  # the first round waits two polls, then the load has dropped
    monkeypatch.setattr(timers, "loadavg", lambda: [next(loads), 0.0, 0.0])
    slept = []
    monkeypatch.setattr(timers.time, "sleep", slept.append)
    cases = [Case("a", "p", lambda: sum(range(1000))), Case("b", "p", lambda: None)]
    res, rounds = run_cases(cases, warmup=1, repeats=2, progress=False, max_load=2.0, max_wait_s=60)
    assert [r.warmup for r in rounds] == [True, False, False] and [r.index for r in rounds] == [0, 1, 2]
    assert rounds[0].waited_s == 10.0 and len(slept) == 2 and not rounds[0].over_max_load
    assert all(r.wall_s >= 0 and r.cpu_s >= 0 and r.loadavg_start is not None for r in rounds)
    assert [len(r.times) for r in res] == [2, 2]


def test_wait_for_load_gives_up_after_max_wait(monkeypatch):
    monkeypatch.setattr(timers, "loadavg", lambda: [9.0, 9.0, 9.0])
    monkeypatch.setattr(timers.time, "sleep", lambda s: None)
    assert timers.wait_for_load(2.0, max_wait_s=20, poll_s=5) == (20.0, True)
    assert timers.wait_for_load(None, max_wait_s=20) == (0.0, False)
