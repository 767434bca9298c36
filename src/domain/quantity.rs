//! Kubernetes resource quantities as integers, so capacity arithmetic is exact.

/// Parses a quantity (`"500m"`, `"2"`, `"4Gi"`, `"1e3"`) into thousandths of its unit, rounding
/// up like the apiserver does, and capped as it caps them: no quantity is more than 2^63 - 1 in
/// magnitude (so sums over every Pod of a cluster stay far inside `i128`; uncapped, two requests
/// of `100000000000000000E` overflowed a node's sum: `two_huge_requests_on_one_node_do_not_overflow`).
/// `None` for anything the apiserver would not accept.
pub fn parse_milli(input: &str) -> Option<i128> {
    let s = input.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-')).unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let (negative, digits) = match number.as_bytes().first()? {
        b'-' => (true, &number[1..]),
        b'+' => (false, &number[1..]),
        _ => (false, number),
    };
    let (int_part, frac_part) = digits.split_once('.').unwrap_or((digits, ""));
    if int_part.is_empty() && frac_part.is_empty()
        || !int_part.bytes().chain(frac_part.bytes()).all(|b| b.is_ascii_digit())
        || int_part.len() + frac_part.len() > 30
    {
        return None;
    }
    // value = mantissa * base^exp10 (decimal) or * 2^exp2 (binary), mantissa scaled by 10^-frac.
    let (exp10, binary_shift): (i32, u32) = match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        exp if exp.starts_with(['e', 'E']) => (exp[1..].parse::<i32>().ok().filter(|e| e.abs() <= 18)?, 0),
        _ => return None,
    };
    let mantissa: i128 = format!("{int_part}{frac_part}").parse().unwrap_or(0);
    let mut numerator = mantissa.checked_mul(1_i128 << binary_shift)?;
    // thousandths: multiply by 10^(3 + exp10 - frac_len)
    let scale = 3 + exp10 - frac_part.len() as i32;
    let value = if scale >= 0 {
        numerator.checked_mul(10_i128.checked_pow(scale as u32)?)?
    } else {
        let divisor = 10_i128.checked_pow((-scale) as u32)?;
        let rounded_up = numerator % divisor != 0;
        numerator /= divisor;
        numerator + i128::from(rounded_up)
    };
    let value = value.min(MAX_MILLI);
    Some(if negative { -value } else { value })
}

/// 2^63 - 1 units, the largest quantity Kubernetes represents, in thousandths.
pub const MAX_MILLI: i128 = i64::MAX as i128 * 1000;

/// Whole units (bytes, GPUs, Pods), rounded up.
pub fn parse_units(input: &str) -> Option<i128> {
    parse_milli(input).map(|m| (m + 999).div_euclid(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_kubernetes_accepts() {
        let cases: &[(&str, Option<i128>)] = &[
            ("500m", Some(500)),
            ("2", Some(2000)),
            ("0.5", Some(500)),
            ("1.5", Some(1500)),
            ("4Gi", Some(4 * 1024 * 1024 * 1024 * 1000)),
            ("512Mi", Some(512 * 1024 * 1024 * 1000)),
            ("1k", Some(1_000_000)),
            ("1e3", Some(1_000_000)),
            ("100n", Some(1)),
            ("0", Some(0)),
            ("-1", Some(-1000)),
            ("", None),
            ("abc", None),
            ("1.2.3", None),
            ("5Xi", None),
            ("NaN", None),
        ];
        for (input, want) in cases {
            assert_eq!(parse_milli(input), *want, "parse_milli({input:?})");
        }
    }

    #[test]
    fn quantities_beyond_what_kubernetes_represents_are_capped_as_it_caps_them() {
        assert_eq!(parse_milli("100000000000000000E"), Some(MAX_MILLI));
        assert_eq!(parse_milli("-100000000000000000E"), Some(-MAX_MILLI));
        assert_eq!(parse_milli("9223372036854775807"), Some(MAX_MILLI));
        assert_eq!(parse_milli("9223372036854775806"), Some(MAX_MILLI - 1000));
        assert_eq!(parse_units("8Ei"), Some(i64::MAX as i128));
    }

    #[test]
    fn units_round_up() {
        assert_eq!(parse_units("1500m"), Some(2));
        assert_eq!(parse_units("1Ki"), Some(1024));
        assert_eq!(parse_units("1"), Some(1));
    }
}
