//! Order statistics for noisy samples: medians, extremes, percentiles and ratios.
//!
//! Every function ignores values that are not finite, so one broken sample cannot turn a
//! summary into NaN.

use serde::{Deserialize, Serialize};

/// The summary of one measured series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// The samples, in the order they were taken (one per round, or per iteration).
    pub samples: Vec<f64>,
}

impl Summary {
    /// The summary of `samples`, or `None` when none is finite.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        let sorted = sorted_finite(samples);
        Some(Summary {
            median: median_sorted(&sorted)?,
            min: *sorted.first()?,
            max: *sorted.last()?,
            samples: samples.to_vec(),
        })
    }

    /// Spread relative to the median: (max - min) / median (0 for a single sample).
    pub fn relative_range(&self) -> f64 {
        if self.median.abs() > f64::EPSILON {
            (self.max - self.min) / self.median.abs()
        } else {
            0.0
        }
    }
}

fn sorted_finite(values: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v
}

fn median_sorted(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// The median of the finite values.
pub fn median(values: &[f64]) -> Option<f64> {
    median_sorted(&sorted_finite(values))
}

/// The `p`-th percentile (0..=100) of the finite values, linearly interpolated between
/// closest ranks.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let v = sorted_finite(values);
    if v.is_empty() || !p.is_finite() {
        return None;
    }
    let rank = (p.clamp(0.0, 100.0) / 100.0) * (v.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    Some(v[lo] + (v[hi] - v[lo]) * (rank - lo as f64))
}

/// The empirical CDF of the finite values as (value, percentile) points, at most `points`
/// of them (evenly spaced ranks, always including the first and the last).
pub fn cdf(values: &[f64], points: usize) -> Vec<(f64, f64)> {
    let v = sorted_finite(values);
    let n = v.len();
    if n == 0 || points == 0 {
        return Vec::new();
    }
    let step = (n as f64 / points as f64).max(1.0);
    let mut out = Vec::new();
    let mut i = 0.0f64;
    while (i as usize) < n {
        let k = i as usize;
        out.push((v[k], (k + 1) as f64 * 100.0 / n as f64));
        i += step;
    }
    if out.last().map(|p| p.1) != Some(100.0) {
        out.push((v[n - 1], 100.0));
    }
    out
}

/// `a / b`, when both are finite and `b` is not zero.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    let r = a / b;
    (a.is_finite() && b.is_finite() && b != 0.0 && r.is_finite()).then_some(r)
}

/// Element-wise ratios of two series taken in pairs (round *i* of the subject against round
/// *i* of the peer); pairs with a missing or zero member are left out.
pub fn paired_ratios(subject: &[Option<f64>], peer: &[Option<f64>]) -> Vec<f64> {
    subject
        .iter()
        .zip(peer)
        .filter_map(|(a, b)| ratio((*a)?, (*b)?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_odd_even_and_broken_series() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(s.samples, vec![3.0, 1.0, 2.0]);
        let s = Summary::of(&[4.0, 1.0, f64::NAN, 2.0, 3.0, f64::INFINITY]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
        assert!(Summary::of(&[]).is_none());
        assert!(Summary::of(&[f64::NAN]).is_none());
        assert_eq!(Summary::of(&[5.0]).unwrap().relative_range(), 0.0);
        assert_eq!(
            Summary::of(&[9.0, 10.0, 11.0]).unwrap().relative_range(),
            0.2
        );
    }

    #[test]
    fn median_resists_a_bimodal_outlier() {
        // Two rounds in the host's slow mode out of five do not move the median.
        let fast_and_slow = [19.8, 5.5, 19.2, 19.5, 5.7];
        assert_eq!(median(&fast_and_slow), Some(19.2));
    }

    #[test]
    fn percentiles_interpolate() {
        let v: Vec<f64> = (1..=101).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(51.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 100.0), Some(101.0));
        assert_eq!(percentile(&v, 99.5), Some(100.5));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7.0], 90.0), Some(7.0));
    }

    #[test]
    fn cdf_is_monotonic_and_ends_at_100() {
        let v: Vec<f64> = (0..1000).rev().map(|i| f64::from(i) * 0.5).collect();
        let c = cdf(&v, 50);
        assert!(c.len() >= 50 && c.len() <= 52, "{}", c.len());
        assert!(c.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
        assert_eq!(c.last(), Some(&(499.5, 100.0)));
        assert_eq!(cdf(&[2.0], 10), vec![(2.0, 100.0)]);
        assert!(cdf(&[], 10).is_empty());
    }

    #[test]
    fn ratios_skip_missing_and_zero() {
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        let r = paired_ratios(
            &[Some(2.0), None, Some(3.0), Some(1.0)],
            &[Some(1.0), Some(1.0), Some(0.0), Some(2.0)],
        );
        assert_eq!(r, vec![2.0, 0.5]);
    }
}
