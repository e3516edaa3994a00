"""engram.stats: the paired t-test, mean/std and p formatting shared by science, bench and benchmarks/."""

from __future__ import annotations

import math

import pytest

from engram.stats import StatisticsError, format_p, mean_std, paired_t, t_sf_two_sided


@pytest.mark.parametrize("t,df,p", [(1.0, 1, 0.5), (2.0, 2, 0.18350341907227397),
                                    (2.0, 3, 0.13932596855884305), (2.0, 4, 0.11611652351681567),
                                    (2.776445105, 4, 0.05), (12.7062047, 1, 0.05), (0.0, 5, 1.0)])
def test_t_distribution_known_values(t, df, p):
    assert t_sf_two_sided(t, df) == pytest.approx(p, abs=1e-6)


def test_t_distribution_needs_a_degree_of_freedom():
    with pytest.raises(StatisticsError, match="df=0"):
        t_sf_two_sided(1.0, 0)


def test_paired_t():
    r = paired_t([1.0, 2.0, 3.0], [0.5, 1.4, 2.6])
    assert r["mean_diff"] == pytest.approx(0.5)
    assert r["n"] == 3 and 0 < r["p"] < 0.05
    assert math.isnan(paired_t([1.0], [0.0])["p"])
    assert math.isnan(paired_t([1.0, 2.0], [0.5, 1.5])["p"])  # identical differences: t undefined
    assert paired_t([1.0, 2.0], [1.0, 2.0])["p"] == 1.0
    with pytest.raises(StatisticsError, match="equal lengths"):
        paired_t([1.0, 2.0], [1.0])


def test_mean_std_is_the_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([4.0]) == (4.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))


@pytest.mark.parametrize("p,text", [(0.0594, "0.059"), (0.001, "0.001"), (0.00012, "1.2e-04"),
                                    (float("nan"), "n/a")])
def test_format_p(p, text):
    assert format_p(p) == text
