"""bench/search_wait.py: its scheduling model against brute force over every assignment."""

import importlib.util
import itertools
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("search_wait", ROOT / "bench" / "search_wait.py")
search_wait = importlib.util.module_from_spec(spec)
spec.loader.exec_module(search_wait)


def test_schedule_is_greedy_longest_first():
    assert search_wait.schedule([3, 2, 2, 1], 2) == 4
    assert search_wait.schedule([5], 3) == 5 and search_wait.schedule([], 2) == 0
    rng = random.Random(0)
    for _ in range(20):
        times = [rng.randint(1, 9) for _ in range(rng.randint(1, 7))]
        w = rng.randint(1, 3)
        best = min(max(sum(t for t, k in zip(times, a) if k == j) for j in range(w))
                   for a in itertools.product(range(w), repeat=len(times)))
        got = search_wait.schedule(times, w)
        # longest-processing-time-first is within 4/3 of the optimum (Graham 1969), never below it
        assert best <= got <= 4 / 3 * best
