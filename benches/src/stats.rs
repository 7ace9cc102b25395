//! Order statistics of timing and memory samples, and the round-robin rotation.
//!
//! Pure functions, so that what the reports print can be checked by unit tests.

use serde::Serialize;

/// Median of ascending `sorted`: the middle value, or the mean of the two middle values when
/// the count is even. `None` when empty.
pub fn median(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// The `percent`th percentile of ascending `sorted` by the nearest-rank method: the value
/// of rank ⌈percent/100 × n⌉ (1-based), always one of the samples. `None` when empty.
///
/// Integer arithmetic, so that 95 % of 40 is rank 38 exactly, not 38 plus a rounding error.
pub fn percentile_nearest_rank(sorted: &[f64], percent: u32) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let percent = percent.min(100) as usize;
    let rank = (percent * n).div_ceil(100).max(1);
    Some(sorted[rank - 1])
}

/// Arithmetic mean. `None` when empty.
pub fn mean(samples: &[f64]) -> Option<f64> {
    (!samples.is_empty()).then(|| samples.iter().sum::<f64>() / samples.len() as f64)
}

/// The order in which round `round` runs `n` variants: starting at variant `round mod n`,
/// then the following ones, wrapping around. Over `n` consecutive rounds every variant runs
/// once in every position.
pub fn rotation(n: usize, round: usize) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    let start = round % n;
    (0..n).map(|i| (start + i) % n).collect()
}

/// What a report says about one set of samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub runs: usize,
    pub median: f64,
    /// Nearest-rank 95th percentile.
    pub p95: f64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    /// Summarizes `samples` (any order). `None` when empty or when a sample is NaN.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.iter().any(|s| s.is_nan()) {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Summary {
            runs: sorted.len(),
            median: median(&sorted)?,
            p95: percentile_nearest_rank(&sorted, 95)?,
            mean: mean(&sorted)?,
            min: *sorted.first()?,
            max: *sorted.last()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[1.0, 2.0, 9.0]), Some(2.0));
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), Some(3.0));
    }

    #[test]
    fn p95_is_the_nearest_rank() {
        let forty: Vec<f64> = (1..=40).map(f64::from).collect();
        // ⌈0.95 × 40⌉ = 38.
        assert_eq!(percentile_nearest_rank(&forty, 95), Some(38.0));
        let twenty: Vec<f64> = (1..=20).map(f64::from).collect();
        // ⌈0.95 × 20⌉ = 19, where a float product could round up to 20.
        assert_eq!(percentile_nearest_rank(&twenty, 95), Some(19.0));
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        // ⌈9.5⌉ = 10: the maximum.
        assert_eq!(percentile_nearest_rank(&ten, 95), Some(10.0));
        assert_eq!(percentile_nearest_rank(&[5.0], 95), Some(5.0));
        assert_eq!(percentile_nearest_rank(&ten, 0), Some(1.0));
        assert_eq!(percentile_nearest_rank(&ten, 100), Some(10.0));
        assert_eq!(percentile_nearest_rank(&[], 95), None);
    }

    #[test]
    fn rotation_starts_one_later_each_round() {
        assert_eq!(rotation(3, 0), vec![0, 1, 2]);
        assert_eq!(rotation(3, 1), vec![1, 2, 0]);
        assert_eq!(rotation(3, 2), vec![2, 0, 1]);
        assert_eq!(rotation(3, 3), vec![0, 1, 2]);
        assert_eq!(rotation(1, 5), vec![0]);
        assert!(rotation(0, 1).is_empty());
    }

    #[test]
    fn rotation_puts_every_variant_in_every_position_equally() {
        let n = 4;
        let mut seen = vec![vec![0; n]; n];
        for round in 0..(3 * n) {
            for (pos, v) in rotation(n, round).into_iter().enumerate() {
                seen[v][pos] += 1;
            }
        }
        assert!(seen.iter().flatten().all(|&c| c == 3), "{seen:?}");
    }

    #[test]
    fn summary_of_unsorted_samples() {
        let s = Summary::of(&[30.0, 10.0, 20.0, 40.0]).unwrap();
        assert_eq!(s.runs, 4);
        assert_eq!(s.median, 25.0);
        assert_eq!(s.p95, 40.0);
        assert_eq!(s.mean, 25.0);
        assert_eq!(s.min, 10.0);
        assert_eq!(s.max, 40.0);
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[1.0, f64::NAN]), None);
    }
}
