//! Byte sizes and rates as people type them (`64K`, `1.5GiB`) and as
//! `mirrorctl` prints them (`64 KiB`, `1.5 GiB`).
//!
//! Suffixes are binary whatever their spelling: `K`, `KB` and `KiB` all mean
//! ×1024, as in QEMU's and the DESIGN's CLI contract. A rate is a size per
//! second and uses the same parser.

/// Binary unit suffixes, in increasing order: index `n` means ×1024ⁿ⁺¹.
const SUFFIXES: [char; 4] = ['K', 'M', 'G', 'T'];

/// Unit names for [`format_size`], index `n` means ×1024ⁿ.
const UNIT_NAMES: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// Why a size or rate string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SizeError {
    /// Nothing but whitespace.
    #[error("empty size")]
    Empty,
    /// A leading minus sign.
    #[error("size {input:?} is negative")]
    Negative {
        /// The string as given.
        input: String,
    },
    /// Not a number followed by an optional suffix.
    #[error("invalid size {input:?}: expected a number with an optional K, M, G or T suffix")]
    Invalid {
        /// The string as given.
        input: String,
    },
    /// A suffix other than K, M, G, T (with optional B / iB).
    #[error(
        "invalid size {input:?}: unknown unit {unit:?} (use K, M, G or T, optionally followed by B or iB)"
    )]
    UnknownUnit {
        /// The string as given.
        input: String,
        /// The part after the number.
        unit: String,
    },
    /// A fraction that does not come out to a whole number of bytes.
    #[error("invalid size {input:?}: not a whole number of bytes")]
    Fractional {
        /// The string as given.
        input: String,
    },
    /// More than `u64::MAX` bytes.
    #[error("size {input:?} is too large (at most {} bytes)", u64::MAX)]
    Overflow {
        /// The string as given.
        input: String,
    },
}

/// Parses a byte count: a plain number (`4096`) or one with a binary suffix
/// `K`, `M`, `G`, `T` (×1024, ×1024², ×1024³, ×1024⁴), case-insensitive,
/// optionally followed by `B` or `iB` (`64K`, `64KB`, `64KiB`, `64 kib`). A
/// bare `B` is accepted too (`512B`). A decimal fraction is accepted when
/// the result is a whole number of bytes (`1.5M`).
///
/// # Errors
///
/// [`SizeError`] for an empty string, a negative number, garbage, an
/// unknown unit, a fraction of a byte, or more than `u64::MAX` bytes.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    if s.starts_with('-') {
        return Err(SizeError::Negative {
            input: input.to_owned(),
        });
    }
    let invalid = || SizeError::Invalid {
        input: input.to_owned(),
    };
    let number_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(number_end);
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if int_part.is_empty()
        || frac_part.contains('.')
        || (number.contains('.') && frac_part.is_empty())
    {
        return Err(invalid());
    }
    let shift = unit_shift(unit.trim_start()).ok_or_else(|| {
        if unit.trim_start().chars().all(|c| c.is_ascii_alphabetic()) {
            SizeError::UnknownUnit {
                input: input.to_owned(),
                unit: unit.trim_start().to_owned(),
            }
        } else {
            invalid()
        }
    })?;
    let overflow = || SizeError::Overflow {
        input: input.to_owned(),
    };
    // value = (int_part . frac_part) * 1024^shift, computed exactly as
    // digits * 1024^shift / 10^frac_len in u128.
    let digits = format!("{int_part}{frac_part}");
    let digits = digits.trim_start_matches('0');
    // 39 decimal digits overflow u128; anything that long is far past u64.
    if digits.len() > 38 {
        return Err(overflow());
    }
    let mantissa: u128 = if digits.is_empty() {
        0
    } else {
        digits.parse().map_err(|_| invalid())?
    };
    let scaled = mantissa
        .checked_mul(1u128 << (10 * shift))
        .ok_or_else(overflow)?;
    let frac_len = u32::try_from(frac_part.len()).map_err(|_| invalid())?;
    let divisor = 10u128.checked_pow(frac_len).ok_or_else(invalid)?;
    if scaled % divisor != 0 {
        return Err(SizeError::Fractional {
            input: input.to_owned(),
        });
    }
    u64::try_from(scaled / divisor).map_err(|_| overflow())
}

/// The power of 1024 a unit stands for, or `None` if it is not a unit.
fn unit_shift(unit: &str) -> Option<u32> {
    let upper = unit.to_ascii_uppercase();
    if upper.is_empty() || upper == "B" {
        return Some(0);
    }
    let mut chars = upper.chars();
    let first = chars.next()?;
    let rest = chars.as_str();
    if !matches!(rest, "" | "B" | "IB") {
        return None;
    }
    SUFFIXES
        .iter()
        .position(|&c| c == first)
        .and_then(|i| u32::try_from(i + 1).ok())
}

/// Formats a byte count for people, in binary units with at most one
/// decimal: `512 B`, `64 KiB`, `1.5 GiB`. Exact multiples print without a
/// decimal; other values are rounded to the nearest tenth.
pub fn format_size(bytes: u64) -> String {
    let mut unit = 0usize;
    while unit + 1 < UNIT_NAMES.len() && bytes >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    let mut divisor = 1u128 << (10 * unit);
    // Tenths of the unit, rounded half up.
    let mut tenths = (u128::from(bytes) * 10 + divisor / 2) / divisor;
    if tenths >= 10 * 1024 && unit + 1 < UNIT_NAMES.len() {
        // 1023.96 KiB rounds to 1024.0 KiB: say 1 MiB instead.
        unit += 1;
        divisor <<= 10;
        tenths = (u128::from(bytes) * 10 + divisor / 2) / divisor;
    }
    let name = UNIT_NAMES[unit];
    if tenths.is_multiple_of(10) {
        format!("{} {name}", tenths / 10)
    } else {
        format!("{}.{} {name}", tenths / 10, tenths % 10)
    }
}

/// Formats a rate in bytes per second: `20 MiB/s`.
pub fn format_rate(bytes_per_sec: u64) -> String {
    format!("{}/s", format_size(bytes_per_sec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_numbers() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("  4096 "), Ok(4096));
        assert_eq!(parse_size("007"), Ok(7));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn binary_suffixes_any_spelling() {
        for s in [
            "64K", "64k", "64KB", "64kb", "64KiB", "64kib", "64 K", "64 KiB",
        ] {
            assert_eq!(parse_size(s), Ok(64 * 1024), "{s}");
        }
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("3t"), Ok(3 << 40));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("512b"), Ok(512));
    }

    #[test]
    fn fractions_that_are_whole_bytes() {
        assert_eq!(parse_size("1.5M"), Ok(3 << 19));
        assert_eq!(parse_size("0.5K"), Ok(512));
        assert_eq!(parse_size("2.0"), Ok(2));
        assert_eq!(
            parse_size("0.1K"),
            Err(SizeError::Fractional {
                input: "0.1K".into()
            })
        );
        assert!(matches!(
            parse_size("1.5"),
            Err(SizeError::Fractional { .. })
        ));
    }

    #[test]
    fn rejects_empty_negative_garbage() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert_eq!(parse_size("   "), Err(SizeError::Empty));
        assert!(matches!(parse_size("-1"), Err(SizeError::Negative { .. })));
        assert!(matches!(parse_size("-4K"), Err(SizeError::Negative { .. })));
        for s in [
            "K", "abc", "+5", "1.2.3", "1.", ".5", "0x10", "1_000", "4K5", "1 2", "4K!",
        ] {
            assert!(
                matches!(
                    parse_size(s),
                    Err(SizeError::Invalid { .. } | SizeError::UnknownUnit { .. })
                ),
                "{s} -> {:?}",
                parse_size(s)
            );
        }
        assert!(matches!(
            parse_size("4X"),
            Err(SizeError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_size("4iB"),
            Err(SizeError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_size("4KK"),
            Err(SizeError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_size("4P"),
            Err(SizeError::UnknownUnit { .. })
        ));
    }

    #[test]
    fn rejects_overflow() {
        assert!(matches!(
            parse_size("18446744073709551616"),
            Err(SizeError::Overflow { .. })
        ));
        assert!(matches!(
            parse_size("16777216T"),
            Err(SizeError::Overflow { .. })
        ));
        assert_eq!(parse_size("16777215T"), Ok(16_777_215 << 40));
        assert!(matches!(
            parse_size("99999999999999999999999999999999999999999999999"),
            Err(SizeError::Overflow { .. })
        ));
        // Leading zeros do not count towards the length limit.
        assert_eq!(
            parse_size("0000000000000000000000000000000000000000001K"),
            Ok(1024)
        );
    }

    #[test]
    fn error_messages_name_the_input() {
        let msg = parse_size("12Q").unwrap_err().to_string();
        assert!(msg.contains("12Q") && msg.contains("\"Q\""), "{msg}");
        let msg = parse_size("x").unwrap_err().to_string();
        assert!(msg.contains("K, M, G or T"), "{msg}");
    }

    #[test]
    fn format_exact_and_fractional() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1024), "1 KiB");
        assert_eq!(format_size(64 * 1024), "64 KiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size(1 << 40), "1 TiB");
        assert_eq!(format_size(1 << 50), "1 PiB");
        assert_eq!(format_size(u64::MAX), "16 EiB");
    }

    #[test]
    fn format_rounds_without_printing_1024() {
        assert_eq!(format_size((1 << 20) - 1), "1 MiB");
        assert_eq!(format_size(1024 + 51), "1 KiB");
        assert_eq!(format_size(1024 + 52), "1.1 KiB");
        assert_eq!(format_rate(20 << 20), "20 MiB/s");
    }

    #[test]
    fn format_then_parse_round_trips_exact_values() {
        for v in [0u64, 1, 512, 1024, 64 << 10, 3 << 19, 5 << 30, 7 << 40] {
            let s = format_size(v).replace(' ', "");
            assert_eq!(parse_size(&s), Ok(v), "{s}");
        }
    }
}
