//! Names of volumes, jobs and exports: short, printable, safe in file names.

use crate::error::{EngineError, Result};

/// Longest accepted name.
pub const MAX_NAME_LEN: usize = 128;

/// Checks that `name` is 1..=128 characters of `[A-Za-z0-9._-]`, not
/// starting with `.` or `-` (it becomes a file name in the state directory).
///
/// # Errors
/// `InvalidArgument` naming `what` and the rule.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(EngineError::invalid(format!(
            "{what} {name:?} must be 1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 . _ - and not start with . or -"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("n", "vol-1.raw_x").is_ok());
        for bad in ["", ".x", "-x", "a/b", "a b", "ä", &"x".repeat(129)] {
            assert!(validate_name("n", bad).is_err(), "{bad:?}");
        }
    }
}
