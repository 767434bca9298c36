//! USD amounts as integer micro-dollars: budgets are compared exactly, never through floats.

use std::fmt;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MicroUsd(pub i64);

impl MicroUsd {
    /// Parses the decimal strings the CRD admits (`"0.50"`, `"12"`, up to 6 decimals).
    pub fn parse(s: &str) -> Option<MicroUsd> {
        let (int_part, frac_part) = s.split_once('.').unwrap_or((s, ""));
        if int_part.is_empty()
            || int_part.len() > 12
            || frac_part.len() > 6
            || (s.contains('.') && frac_part.is_empty())
            || !int_part.bytes().chain(frac_part.bytes()).all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let whole: i64 = int_part.parse().ok()?;
        let frac: i64 = format!("{frac_part:0<6}").parse().ok()?;
        whole.checked_mul(1_000_000)?.checked_add(frac).map(MicroUsd)
    }

    /// Rounds a float dollar amount (from token × price arithmetic) to the nearest micro-dollar.
    pub fn from_usd(usd: f64) -> MicroUsd {
        if usd.is_finite() { MicroUsd((usd * 1e6).round() as i64) } else { MicroUsd(i64::MAX) }
    }

    pub fn as_usd(self) -> f64 {
        self.0 as f64 / 1e6
    }

    pub fn saturating_add(self, other: MicroUsd) -> MicroUsd {
        MicroUsd(self.0.saturating_add(other.0))
    }
}

impl std::iter::Sum for MicroUsd {
    fn sum<I: Iterator<Item = MicroUsd>>(iter: I) -> MicroUsd {
        iter.fold(MicroUsd(0), MicroUsd::saturating_add)
    }
}

/// At least two decimals (`0.50`), more only when they carry information (`0.000150`).
impl fmt::Display for MicroUsd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let frac = format!("{:06}", abs % 1_000_000);
        let frac = frac.trim_end_matches('0');
        write!(f, "{sign}{}.{:0<2}", abs / 1_000_000, frac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_budget_strings_exactly() {
        let cases: &[(&str, Option<i64>)] = &[
            ("0.50", Some(500_000)),
            ("12", Some(12_000_000)),
            ("0.000001", Some(1)),
            ("1000000", Some(1_000_000_000_000)),
            ("1.", None),
            ("-1", None),
            ("1e9", None),
            ("NaN", None),
            ("0.1234567", None),
            ("", None),
        ];
        for (input, want) in cases {
            assert_eq!(MicroUsd::parse(input).map(|m| m.0), *want, "{input:?}");
        }
    }

    #[test]
    fn displays_with_two_to_six_decimals() {
        assert_eq!(MicroUsd(500_000).to_string(), "0.50");
        assert_eq!(MicroUsd(12_000_000).to_string(), "12.00");
        assert_eq!(MicroUsd(150).to_string(), "0.00015");
        assert_eq!(MicroUsd(1_234_567).to_string(), "1.234567");
    }
}
