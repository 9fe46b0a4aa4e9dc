//! Summaries over repeated runs: every figure is reported as median, min and max.

use serde::Serialize;

/// A figure over several runs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Range {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Range {
    pub fn of(values: &[f64]) -> Range {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return Range {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                runs: 0,
            };
        }
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Range {
            median: round(median),
            min: round(v[0]),
            max: round(v[n - 1]),
            runs: n,
        }
    }

    /// `median (min–max)` for the human summary.
    pub fn show(&self, decimals: usize) -> String {
        format!(
            "{:.d$} ({:.d$}–{:.d$})",
            self.median,
            self.min,
            self.max,
            d = decimals
        )
    }
}

/// Three significant decimals are plenty for any figure here.
pub fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let r = Range::of(&[3.0, 1.0, 2.0]);
        assert_eq!((r.median, r.min, r.max, r.runs), (2.0, 1.0, 3.0, 3));
        let r = Range::of(&[4.0, 1.0, 2.0, 3.0]);
        assert_eq!(r.median, 2.5);
        assert_eq!(Range::of(&[]).runs, 0);
    }
}
