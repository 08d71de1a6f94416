//! Sizes: parsing with explicit units and printing with bytes plus an IEC value.
//!
//! Accepted: exact bytes (`1048576`, `1048576B`), binary units `KiB MiB GiB TiB PiB` (powers of
//! 1024) and decimal units `KB MB GB TB PB` (powers of 1000). Units are case-insensitive except
//! that the ambiguous single letters (`K`, `M`, `G`, `T`, `P`, with or without a trailing `b`) are
//! refused with a message naming both meanings. Fractions are allowed when the result is a whole
//! number of bytes (`1.5GiB`).

use thiserror::Error;

/// Why a size string was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("empty size")]
    Empty,
    #[error(
        "ambiguous unit '{unit}' in '{input}': write {binary} (= {binary_bytes} bytes, powers of 1024) or {decimal} (= {decimal_bytes} bytes, powers of 1000)"
    )]
    Ambiguous {
        input: String,
        unit: String,
        binary: String,
        binary_bytes: u64,
        decimal: String,
        decimal_bytes: u64,
    },
    #[error(
        "unknown unit '{unit}' in '{input}': use B, KiB, MiB, GiB, TiB (1024) or KB, MB, GB, TB (1000)"
    )]
    UnknownUnit { input: String, unit: String },
    #[error("'{0}' is not a number followed by an optional unit")]
    NotANumber(String),
    #[error("'{0}' is not a whole number of bytes")]
    Fractional(String),
    #[error("'{0}' is too large")]
    Overflow(String),
}

const BINARY: [(&str, u32); 6] = [
    ("b", 0),
    ("kib", 1),
    ("mib", 2),
    ("gib", 3),
    ("tib", 4),
    ("pib", 5),
];
const DECIMAL: [(&str, u32); 5] = [("kb", 1), ("mb", 2), ("gb", 3), ("tb", 4), ("pb", 5)];
const AMBIGUOUS: [(&str, u32, &str, &str); 5] = [
    ("k", 1, "KiB", "KB"),
    ("m", 2, "MiB", "MB"),
    ("g", 3, "GiB", "GB"),
    ("t", 4, "TiB", "TB"),
    ("p", 5, "PiB", "PB"),
];

/// Parses a size such as `10GiB`, `500MB`, `4096` or `1.5TiB` into bytes.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: String = num.chars().filter(|c| *c != '_').collect();
    let unit = unit.trim();
    let unit_lc = unit.to_ascii_lowercase();
    if num.is_empty() {
        return Err(SizeError::NotANumber(input.to_string()));
    }
    let multiplier: u128 = if unit_lc.is_empty() {
        1
    } else if let Some((_, exp)) = BINARY.iter().find(|(u, _)| *u == unit_lc) {
        1024u128.pow(*exp)
    } else if let Some((_, exp)) = DECIMAL.iter().find(|(u, _)| *u == unit_lc) {
        1000u128.pow(*exp)
    } else if let Some((_, exp, bin, dec)) = AMBIGUOUS.iter().find(|(u, _, _, _)| *u == unit_lc) {
        let n = parse_amount(&num, 1, input).unwrap_or(0);
        return Err(SizeError::Ambiguous {
            input: input.to_string(),
            unit: unit.to_string(),
            binary: format!("{num}{bin}"),
            binary_bytes: (n as u128 * 1024u128.pow(*exp)).min(u64::MAX as u128) as u64,
            decimal: format!("{num}{dec}"),
            decimal_bytes: (n as u128 * 1000u128.pow(*exp)).min(u64::MAX as u128) as u64,
        });
    } else {
        return Err(SizeError::UnknownUnit {
            input: input.to_string(),
            unit: unit.to_string(),
        });
    };
    parse_amount(&num, multiplier, input)
}

/// `num` is digits with at most one dot; returns `num * multiplier` if it is a whole number.
fn parse_amount(num: &str, multiplier: u128, input: &str) -> Result<u64, SizeError> {
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if int.is_empty() && frac.is_empty() || frac.contains('.') {
        return Err(SizeError::NotANumber(input.to_string()));
    }
    let overflow = || SizeError::Overflow(input.to_string());
    let int_v: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| overflow())?
    };
    let mut total = int_v.checked_mul(multiplier).ok_or_else(overflow)?;
    if !frac.is_empty() {
        if frac.len() > 18 {
            return Err(SizeError::NotANumber(input.to_string()));
        }
        let frac_v: u128 = frac
            .parse()
            .map_err(|_| SizeError::NotANumber(input.to_string()))?;
        let denom = 10u128.pow(frac.len() as u32);
        let scaled = frac_v.checked_mul(multiplier).ok_or_else(overflow)?;
        if scaled % denom != 0 {
            return Err(SizeError::Fractional(input.to_string()));
        }
        total = total.checked_add(scaled / denom).ok_or_else(overflow)?;
    }
    u64::try_from(total).map_err(|_| overflow())
}

/// Formats a byte count as an IEC value, e.g. `1.00 GiB`, `512 B`.
pub fn format_iec(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.2} {}", UNITS[i])
}

/// Formats a size as an operator reads it everywhere in tandem: exact bytes and an IEC value,
/// e.g. `1073741824 B (1.00 GiB)`.
pub fn format_size(bytes: u64) -> String {
    if bytes < 1024 {
        format!("{bytes} B")
    } else {
        format!("{bytes} B ({})", format_iec(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_bytes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size(" 1_048_576 "), Ok(1 << 20));
    }

    #[test]
    fn binary_and_decimal_units() {
        assert_eq!(parse_size("1KiB"), Ok(1024));
        assert_eq!(parse_size("1kib"), Ok(1024));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
        assert_eq!(parse_size("1KB"), Ok(1000));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("0.5KB"), Ok(500));
    }

    #[test]
    fn ambiguous_units_are_refused_with_both_meanings() {
        for s in ["1G", "1g", "10M", "3T", "1K", "2p"] {
            let err = parse_size(s).unwrap_err();
            assert!(matches!(err, SizeError::Ambiguous { .. }), "{s}: {err:?}");
        }
        let msg = parse_size("10G").unwrap_err().to_string();
        assert!(msg.contains("10GiB") && msg.contains("10GB"), "{msg}");
        assert!(
            msg.contains("10737418240") && msg.contains("10000000000"),
            "{msg}"
        );
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert!(matches!(parse_size("abc"), Err(SizeError::NotANumber(_))));
        assert!(matches!(
            parse_size("1XB"),
            Err(SizeError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_size("1.1.1GiB"),
            Err(SizeError::NotANumber(_))
        ));
        assert!(matches!(parse_size("0.3B"), Err(SizeError::Fractional(_))));
        assert!(matches!(
            parse_size("99999999EiB"),
            Err(SizeError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_size("99999999999PiB"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn formatting() {
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(1 << 30), "1073741824 B (1.00 GiB)");
        assert_eq!(format_iec(1536), "1.50 KiB");
    }

    proptest::proptest! {
        #[test]
        fn bytes_round_trip(n in 0u64..u64::MAX) {
            proptest::prop_assert_eq!(parse_size(&n.to_string()), Ok(n));
        }

        #[test]
        fn gib_scales(n in 0u64..1_000_000) {
            proptest::prop_assert_eq!(parse_size(&format!("{n}GiB")), Ok(n << 30));
            proptest::prop_assert_eq!(parse_size(&format!("{n}GB")), Ok(n * 1_000_000_000));
        }
    }
}
